"""Shared benchmark plumbing: each contender in its own subprocess, phase timers with per-phase peak RSS, tables.

Peak RSS is the kernel's high-water mark (VmHWM in /proc/self/status, which counts touched pages of memory-mapped
files too). Where /proc/self/clear_refs accepts "5" (Linux >= 4.0) the mark is reset at the start of every phase,
so each phase reports its own peak and the process peak is the largest of them; elsewhere ru_maxrss is used and a
phase's figure is the process peak so far.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VIDSYNTH_SHARED", REPO.parent / "shared"))
GIB = 1024 ** 3
RESULT_MARK = "@@result "


# ----------------------------------------------------------------------------------------------- in the child
def peak_rss() -> int:
    """This process's peak resident set size in bytes (since the last reset)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class Phases:
    """``with phases("denoise"): ...`` records wall time and peak RSS (and peak CUDA memory) of each phase."""

    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda")
        self.results: dict[str, dict[str, float]] = {}
        self.process_peak = 0

    @contextmanager
    def __call__(self, name: str):
        import torch

        self.process_peak = max(self.process_peak, peak_rss())
        rss_start = current_rss()
        resettable = reset_peak_rss()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = peak_rss()
        self.process_peak = max(self.process_peak, peak)
        self.results[name] = {"s": seconds, "rss": peak if resettable else self.process_peak,
                              "rss_start": rss_start}
        if self.cuda:
            self.results[name]["gpu"] = torch.cuda.max_memory_allocated()

    def report(self, **extra) -> None:
        """Hand the figures to the parent (one marked JSON line on stdout)."""
        print(RESULT_MARK + json.dumps({"phases": self.results, "peak_rss": max(self.process_peak, peak_rss()),
                                         **extra}), flush=True)


@contextmanager
def timed_calls(totals: dict[str, float], name: str, obj, attribute: str):
    """Add the wall time of every ``obj.attribute(...)`` call to ``totals[name]`` (wraps the bound method)."""
    original = getattr(obj, attribute)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(obj, attribute, wrapper)
    try:
        yield
    finally:
        setattr(obj, attribute, original)


@contextmanager
def timed_forwards(totals: dict[str, float], name: str, module, sync=None):
    """Add the wall time of every forward of ``module`` to ``totals[name]`` and count them in ``totals[name + '#']``."""
    state = {}

    def before(*_):
        if sync:
            sync()
        state["start"] = time.perf_counter()

    def after(*_):
        if sync:
            sync()
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - state["start"]
        totals[name + "#"] = totals.get(name + "#", 0) + 1

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- in the parent
def run_isolated(script: str | Path, worker: str, **kwargs) -> dict:
    """Run ``worker(**kwargs)`` from ``script`` in a fresh Python process and return what it reported.

    The child runs offline (HF_HUB_OFFLINE) so nothing can be downloaded; its stderr passes through."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(script).parent), os.environ.get("PYTHONPATH")]))}
    code = (f"import json, sys; import {Path(script).stem} as bench; "
            f"bench.{worker}(**json.loads(sys.argv[1]))")
    load_before, start = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], env=env, stdout=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"{worker} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    # the machine may be shared: CPU contention shows in the load average (2 = our own 2 threads on 2 cores)
    result.update(wall_s=wall, load_avg=(load_before, os.getloadavg()[0]))
    return result


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def print_table(title: str, rows: list[tuple[str, float | None, float | None, str]], names=("ours", "diffusers"),
                results: tuple[dict | None, ...] = ()):
    """rows: (label, ours, theirs, unit) with unit "s" or "bytes"; ratio = ours / theirs. ``results`` (as returned by
    run_isolated) adds the 1-minute load average at the start and end of each contender's run."""
    print(f"\n{title}")
    print(f"{'':28s} {names[0]:>12s} {names[1]:>12s} {'ours/theirs':>12s}")
    for label, ours, theirs, unit in rows:
        fmt = (lambda v: f"{v:10.2f} s") if unit == "s" else (lambda v: f"{v / GIB:8.2f} GiB")
        cells = [fmt(v) if v is not None else "-" for v in (ours, theirs)]
        ratio = f"{ours / theirs:12.2f}" if ours is not None and theirs else f"{'-':>12s}"
        print(f"{label:28s} {cells[0]:>12s} {cells[1]:>12s} {ratio}")
    if results:
        loads = ["{:.1f}..{:.1f}".format(*r["load_avg"]) if r else "-" for r in results]
        print(f"{'load average (start..end)':28s} {loads[0]:>12s} {loads[1]:>12s}")


def ensure_checkpoint(workdir: Path, manifest: str, dtype: str | None = None) -> Path:
    """A full-size random file in the real layout of ``manifest`` (cached in ``workdir``), written by the project's
    ../shared/tools/make_checkpoint.py; nothing is downloaded."""
    out = workdir / (f"{dtype}-{manifest}" if dtype else manifest)
    if out.exists():
        return out
    layout = SHARED / "checkpoint-layouts" / f"{manifest}.json"
    tool = SHARED / "tools" / "make_checkpoint.py"
    if not layout.exists() or not tool.exists():
        raise SystemExit(f"{layout} or {tool} is missing; set VIDSYNTH_SHARED to the project's shared folder")
    workdir.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial" + out.suffix)
    cmd = [sys.executable, str(tool), str(layout), str(partial), "--seed", "0"] + (["--dtype", dtype] if dtype else [])
    print(f"writing {out} ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    partial.rename(out)
    return out
