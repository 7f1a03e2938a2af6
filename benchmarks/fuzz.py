"""The long checkpoint fuzz run: ``python benchmarks/fuzz.py --cases 10000 [--seed N]``.

The same engine and families as tests/test_fuzz_checkpoints.py (tests/checkpoint_fuzz.py); prints a table per
family (cases / loaded / refused / escapes) and every escape with its case number, which reproduces it alone.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from checkpoint_fuzz import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
