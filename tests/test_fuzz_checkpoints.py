"""Fuzzed checkpoint files load or are refused with our error naming the file; nothing else escapes.

300 seeded cases (the engine and its mutation families are in ``checkpoint_fuzz.py``; ``benchmarks/fuzz.py
--cases 10000`` runs the long version). The first cases are the unmutated seeds, which must load: a harness whose
files never load would pass vacuously.
"""
from __future__ import annotations

from collections import Counter

import checkpoint_fuzz

CASES = 300


def test_fuzzed_checkpoints_load_or_are_refused_naming_the_file():
    results = checkpoint_fuzz.fuzz(CASES, fuzz_seed=0)
    print(checkpoint_fuzz.summary(results))
    assert len(results) == CASES
    escapes = [f"case {r['case']} [{r['family']}] {r['seed']}: {r['detail']}" for r in results
               if r["outcome"] not in ("loaded", "refused")]
    assert not escapes, "\n".join(escapes)
    outcomes = Counter((r["family"], r["outcome"]) for r in results)
    assert outcomes[("seed", "loaded")] == sum(r["family"] == "seed" for r in results) == 6
    families = {r["family"] for r in results} - {"seed"}
    assert families == set(checkpoint_fuzz.FAMILIES)  # every family ran
    for family in families:  # and each one produced broken files, not only harmless ones
        assert outcomes[(family, "refused")] > 0, family
