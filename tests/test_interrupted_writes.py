"""A writer killed mid-write (a video, a PNG folder, a trained checkpoint, a download) leaves the final path holding
the previous complete file, or nothing; the next run cleans up or reuses what it left.

Each test runs the writer in a child process, watches for the write to be under way (its temporary growing, or the
server having sent part of the body), SIGKILLs it, checks the final path, then writes again in this process. The
checkpoint writer is stopped by the kernel instead (SIGXFSZ at a file-size limit): see its test.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import test_download
from vidsynth import download
from vidsynth.train.loop import save_file
from vidsynth.video_io import load_video, save_video

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def child(code: str, env: dict | None = None) -> subprocess.Popen:
    prelude = f"import sys; sys.path[:0] = [{str(SRC)!r}, {str(TESTS)!r}]\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})


def kill_when(proc: subprocess.Popen, under_way, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``under_way()`` holds; fails if it finished (or died) first."""
    deadline = time.monotonic() + timeout
    while not under_way():
        if proc.poll() is not None:
            pytest.fail(f"the writer ended (exit {proc.returncode}) before it could be killed mid-write: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the write never got under way")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def hidden_siblings(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def frames(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["clip.mp4", "frames"])
def test_killed_video_write_keeps_the_previous_video(tmp_path, name):
    out = tmp_path / name
    save_video(frames(3), out, fps=8)
    previous = np.stack([np.asarray(f) for f in load_video(out)])
    proc = child(f"""
        import numpy as np
        from vidsynth.video_io import save_video
        save_video(np.random.default_rng(1).integers(0, 256, (600, 256, 256, 3), dtype=np.uint8), {str(out)!r})
    """)

    def under_way():  # the temporary has frames in it
        return any((p.is_file() and p.stat().st_size > 50_000) or (p.is_dir() and len(list(p.iterdir())) >= 3)
                   for p in hidden_siblings(out))

    kill_when(proc, under_way)
    assert np.array_equal(np.stack([np.asarray(f) for f in load_video(out)]), previous), "the previous video changed"
    assert hidden_siblings(out), "the killed writer left no temporary: the test did not interrupt a write"
    save_video(frames(5, seed=2), out, fps=8)  # the next run
    assert len(load_video(out)) == 5
    assert hidden_siblings(out) == []  # the killed writer's temporary is gone


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_killed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, suffix):
    """The trainer writes its result and its step checkpoints' weights through ``train.loop.save_file``.
    safetensors writes a file in one call, too fast to catch from outside on a busy machine, so the kernel stops
    the writer instead: a 32 MB file-size limit with SIGXFSZ at its default action terminates it there, as
    abruptly as SIGKILL (no handler, no ``finally``), half-way through its 160 MB temporary."""
    from vidsynth.checkpoints import Checkpoint

    out = tmp_path / f"motion_lora{suffix}"
    tmp = out.with_name(out.name + ".tmp")
    save_file({"w": torch.arange(10.0)}, out)
    before = out.read_bytes()
    proc = child(f"""
        import resource, signal
        import torch
        from pathlib import Path
        from vidsynth.train.loop import save_file
        state = {{f"w{{i}}": torch.ones(1 << 20) for i in range(40)}}
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 20, 32 << 20))
        save_file(state, Path({str(out)!r}))
    """)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr.read().decode()[-2000:]
    assert tmp.stat().st_size == 32 << 20  # stopped mid-write
    assert out.read_bytes() == before
    save_file({"w": torch.arange(3.0)}, out)  # the next run reuses the temporary's name
    assert not tmp.exists()
    assert torch.equal(Checkpoint(out).tensor("w"), torch.arange(3.0))


class _Paced:
    """A response stream that trickles: the client is mid-transfer long enough to be killed."""

    def __init__(self, stream, hub):
        self.stream, self.hub = stream, hub

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), 8192):
            self.stream.write(data[i:i + 8192])
            self.stream.flush()
            self.hub.sent += len(data[i:i + 8192])
            time.sleep(self.hub.pause)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class SlowHub(test_download.FakeHub):
    def __init__(self):
        super().__init__()
        self.sent, self.pause = 0, 0.03

    def send(self, req, data, head, headers, ranged=False):
        if ranged and not head:
            req.wfile = _Paced(req.wfile, self)
        super().send(req, data, head, headers, ranged)


@pytest.fixture
def slow_hub(tmp_path, monkeypatch):
    hub = SlowHub()
    handler = type("Handler", (BaseHTTPRequestHandler,), {
        "do_GET": lambda self: hub.handle(self, head=False), "do_HEAD": lambda self: hub.handle(self, head=True),
        "log_message": lambda self, *args: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    env = {"HF_ENDPOINT": base, "MODELSCOPE_ENDPOINT": base, "HF_HOME": str(tmp_path / "hf_home"),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "HF_HUB_OFFLINE": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(download, "presets", lambda: download.parse_presets(test_download.TABLE))
    hub.env = env
    yield hub
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("source", test_download.SOURCES)
def test_killed_download_leaves_no_file_and_the_next_run_completes(slow_hub, tmp_path, source):
    models = tmp_path / "models"
    target = models / "tiny" / "model.bin"
    proc = child(f"""
        import test_download
        from vidsynth import download
        import huggingface_hub.constants
        download.presets = lambda: download.parse_presets(test_download.TABLE)
        download.CHUNK = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE = 1 << 13  # written as it arrives
        download.download_models(["tiny"], {str(models)!r}, sources=[{source!r}], progress=False)
    """, slow_hub.env)
    kill_when(proc, lambda: slow_hub.sent > len(test_download.CONTENT) // 3)
    assert not target.exists()
    slow_hub.pause, slow_hub.requests = 0.0, []
    (path,) = download.download_models(["tiny"], models, sources=[source], progress=False)
    assert path == target and path.read_bytes() == test_download.CONTENT
    assert test_download.leftovers(models) == [] and sorted(os.listdir(target.parent)) == ["model.bin"]
    if source == "ModelScope":  # the killed run's partial file was resumed, not fetched again
        ranges = [r for method, p, r in slow_hub.requests if method == "GET" and "FilePath" in p]
        assert ranges and ranges[0] and int(ranges[0].split("=")[1].split("-")[0]) > 0, json.dumps(ranges)
