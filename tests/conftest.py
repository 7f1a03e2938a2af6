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


FULL_SIZE_BUDGET = int(float(os.environ.get("VIDSYNTH_TEST_DISK_GB", "16")) * 2**30)
_DTYPE_BYTES = {"float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4, "int64": 8, "int32": 4}


def full_size_bytes(manifest: Path, dtype: str | None) -> int:
    """What make_checkpoint.py will write for ``manifest`` (tensor bytes; headers and pickling add little)."""
    import json
    import math

    layout = json.loads(manifest.read_text())
    overrides = layout.get("dtype_overrides") or {}

    def walk(spec: dict, path: str) -> int:
        total = 0
        for key, shape in spec.items():
            full = f"{path}/{key}" if path else key
            if isinstance(shape, dict):
                total += walk(shape, full)
            else:
                kind = overrides.get(full, dtype or layout.get("dtype", "float32"))
                total += math.prod(shape) * _DTYPE_BYTES.get(kind, 4)
        return total

    return walk(layout["tensors"], "")


class FullSizeFiles:
    """Full-size random files, each made once and shared between tests, kept under a disk budget: a suite that
    wrote every layout it uses and kept them all would need ~40 GB of /tmp. A file handed out in the running test
    module is never evicted (module fixtures hold its path); older ones go, least recently used first, and are
    made again if a later module asks. Everything is deleted when the session ends."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[tuple[str, str | None], tuple[Path, int, str]] = {}  # key -> (path, bytes, module)
        self.module = ""

    def __call__(self, name: str, dtype: str | None = None) -> Path:
        shared = shared_or_skip()
        key = (name, dtype)
        if key in self.files:
            path, size, _ = self.files.pop(key)
            self.files[key] = (path, size, self.module)  # most recently used last
            return path
        manifest = shared / "checkpoint-layouts" / f"{name}.json"
        size = full_size_bytes(manifest, dtype)
        self._make_room(size, name)
        out = self.root / f"{dtype or 'native'}-{name}"
        cmd = [sys.executable, str(shared / "tools" / "make_checkpoint.py"), str(manifest), str(out), "--seed", "0"]
        if dtype:
            cmd += ["--dtype", dtype]
        subprocess.run(cmd, check=True, capture_output=True)
        self.files[key] = (out, size, self.module)
        return out

    def _make_room(self, size: int, name: str) -> None:
        import shutil

        def held() -> int:
            return sum(bytes_ for _, bytes_, _ in self.files.values())

        for key, (path, bytes_, module) in list(self.files.items()):
            if held() + size <= FULL_SIZE_BUDGET and shutil.disk_usage(self.root).free > size + 2**30:
                break
            if module != self.module:
                path.unlink(missing_ok=True)
                del self.files[key]
        free = shutil.disk_usage(self.root).free
        if free < size + 2**30:
            pytest.fail(f"{name}: a full-size random file needs {size / 2**30:.1f} GiB of disk and {self.root} has "
                        f"{free / 2**30:.1f} GiB free; free some space (old /tmp/pytest-of-* folders) or set "
                        f"--basetemp to a bigger disk")

    def close(self) -> None:
        for path, _, _ in self.files.values():
            path.unlink(missing_ok=True)
        self.files.clear()


@pytest.fixture(scope="session")
def full_size_files(tmp_path_factory):
    files = FullSizeFiles(tmp_path_factory.mktemp("full_checkpoints"))
    yield files
    files.close()


@pytest.fixture(scope="module", autouse=True)
def _full_size_module(request, full_size_files):
    """Tells the full-size cache which module is running (what it must not evict); autouse, so it is set before the
    module's own fixtures ask for files."""
    full_size_files.module = request.module.__name__


@pytest.fixture(scope="session")
def full_checkpoint(full_size_files):
    """``full_checkpoint("mm_sd_v15_v2.ckpt", dtype="float32") -> Path``: a full-size random file in the real layout,
    written by ../shared/tools/make_checkpoint.py (see FullSizeFiles)."""
    return full_size_files
