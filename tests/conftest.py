"""Shared fixtures: the read-only ../shared folder and full-size random checkpoints made from its layouts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VIDSYNTH_SHARED", REPO.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


SHARED_ABSENT = "(the project's shared checkpoint layouts) is absent on this machine"


def shared_or_skip() -> Path:
    if not (SHARED / "checkpoint-layouts").is_dir():
        pytest.skip(f"{SHARED} {SHARED_ABSENT}")
    return SHARED


def _fail_unexpected_skip(report) -> None:
    """Under CI (CI=true, as .ci/run sets it) a skip for any reason but an absent ../shared is a failure: a parity
    test that skips because diffusers fails to import hides a gap instead of showing it."""
    if report.skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if SHARED_ABSENT not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped under CI for a reason other than an absent ../shared: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level pytest.importorskip skips the whole file at collection
    _fail_unexpected_skip(outcome.get_result())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread mostly waits (several times slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return shared_or_skip()


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory):
    """``full_checkpoint("mm_sd_v15_v2.ckpt", dtype="float32") -> Path``: a full-size random file in the real layout,
    written once per test session by ../shared/tools/make_checkpoint.py and shared between tests."""
    cache: dict[tuple[str, str | None], Path] = {}
    root = tmp_path_factory.mktemp("full_checkpoints")

    def make(name: str, dtype: str | None = None) -> Path:
        shared = shared_or_skip()
        key = (name, dtype)
        if key not in cache:
            manifest = shared / "checkpoint-layouts" / f"{name}.json"
            out = root / f"{dtype or 'native'}-{name}"
            cmd = [sys.executable, str(shared / "tools" / "make_checkpoint.py"), str(manifest), str(out), "--seed", "0"]
            if dtype:
                cmd += ["--dtype", dtype]
            subprocess.run(cmd, check=True, capture_output=True)
            cache[key] = out
        return cache[key]

    return make
