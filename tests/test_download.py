"""download_models against a local server that imitates both sources; never touches the real internet."""
from __future__ import annotations

from urllib.parse import unquote

import hashlib
import json
import logging
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import huggingface_hub.constants
import pytest

from vidsynth import download
from vidsynth.errors import ConfigError, VidsynthError

SHIPPED_PRESETS = download.presets
CONTENT = random.Random(0).randbytes(300_000)
SOURCES = ["HuggingFace", "ModelScope"]
TABLE = {
    "presets": {
        "tiny": {
            "about": "a small fake model",
            "aliases": ["Tiny_v1"],
            "files": [{"path": "tiny/model.bin", "HuggingFace": "org/tiny", "ModelScope": "ms-org/tiny"}],
        }
    }
}


class FakeHub:
    """Serves CONTENT as Hugging Face (`/{repo}/resolve/{rev}/{file}`, HEAD+GET with the headers huggingface_hub
    reads) and as ModelScope (`/api/v1/models/{repo}/repo/files` listing, `/api/v1/models/{repo}/repo?FilePath=`)."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cut_next = False  # the next body GET breaks off half-way
        self.corrupt = False  # serve a flipped byte while stating the true size and sha256
        self.failing: set[str] = set()  # sources that answer 500

    def handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(req.path)
        self.requests.append((req.command, req.path, req.headers.get("Range")))
        source = "ModelScope" if url.path.startswith("/api/v1/models/") else "HuggingFace"
        if source in self.failing:
            return req.send_error(500, "imitated outage")
        sha = hashlib.sha256(CONTENT).hexdigest()
        if url.path.endswith("/repo/files"):
            listing = {"Code": 200, "Data": {"Files": [
                {"Name": "README.md", "Path": "README.md", "Type": "blob", "Size": 10, "Sha256": "0" * 64},
                {"Name": "model.bin", "Path": "model.bin", "Type": "blob", "Size": len(CONTENT), "Sha256": sha},
            ]}}
            return self.send(req, json.dumps(listing).encode(), head, {"Content-Type": "application/json"})
        if source == "ModelScope":
            assert url.path == "/api/v1/models/ms-org/tiny/repo" and parse_qs(url.query)["FilePath"] == ["model.bin"]
        else:
            assert url.path.startswith("/org/tiny/resolve/") and url.path.endswith("/model.bin")
        body = bytearray(CONTENT)
        if self.corrupt:
            body[len(body) // 3] ^= 0xFF
        hf = {"X-Repo-Commit": "a" * 40, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
              "X-Linked-Size": str(len(body))}
        self.send(req, bytes(body), head, hf if source == "HuggingFace" else {}, ranged=True)

    def send(self, req, data: bytes, head: bool, headers: dict, ranged: bool = False) -> None:
        start = int(req.headers["Range"].split("=")[1].split("-")[0]) if ranged and req.headers.get("Range") else 0
        body = data[start:]
        req.send_response(206 if start else 200)
        for key, value in {**headers, "Content-Length": str(len(body)), "Accept-Ranges": "bytes"}.items():
            req.send_header(key, value)
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        if head:
            return
        if ranged and self.cut_next:  # the connection closes after half the promised bytes
            self.cut_next = False
            body = body[: len(body) // 2]
        req.wfile.write(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Every test: both sources point at a closed local port, HF's home is private, the test table is in use."""
    dead = f"http://127.0.0.1:{free_port()}"
    for key, value in {"HF_ENDPOINT": dead, "MODELSCOPE_ENDPOINT": dead, "HF_HOME": str(tmp_path / "hf_home"),
                       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(download, "presets", lambda: download.parse_presets(TABLE))
    return dead


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    handler = type("Handler", (BaseHTTPRequestHandler,), {
        "do_GET": lambda self: fake.handle(self, head=False),
        "do_HEAD": lambda self: fake.handle(self, head=True),
        "log_message": lambda self, *args: None,
    })
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", base)
    yield fake
    server.shutdown()
    server.server_close()


def leftovers(models: Path) -> list[str]:
    return sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.name != "model.bin" and not p.is_dir())


@pytest.mark.parametrize("source", SOURCES)
def test_fetches_into_the_preset_path_once(hub, tmp_path, source):
    models = tmp_path / "models"
    paths = download.download_models(["Tiny_v1"], models, sources=[source], progress=False)
    assert paths == [models / "tiny" / "model.bin"]
    assert paths[0].read_bytes() == CONTENT
    assert leftovers(models) == [] and [p.name for p in (models / "tiny").iterdir()] == ["model.bin"]
    seen = len(hub.requests)
    assert download.download_models(["tiny"], models, sources=[source], progress=False) == paths
    assert len(hub.requests) == seen  # complete file present: no request at all


def test_a_file_already_in_place_is_kept_even_if_its_size_differs(hub, tmp_path, caplog, monkeypatch):
    table = json.loads(json.dumps(TABLE))
    table["presets"]["tiny"]["files"][0]["size"] = len(CONTENT)
    monkeypatch.setattr(download, "presets", lambda: download.parse_presets(table))
    own = tmp_path / "models" / "tiny" / "model.bin"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"my own fine-tune")
    assert download.download_models(["Tiny_v1"], tmp_path / "models", progress=False) == [own]
    assert own.read_bytes() == b"my own fine-tune" and hub.requests == []
    assert "using it as it is" in caplog.text


@pytest.mark.parametrize("source", SOURCES)
def test_transfer_cut_half_way_resumes_with_range(hub, tmp_path, source, monkeypatch):
    # huggingface_hub writes (and so resumes from) whole chunks only, 10 MB by default
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub.cut_next = True
    (path,) = download.download_models(["tiny"], tmp_path, sources=[source], progress=False)
    assert path.read_bytes() == CONTENT
    ranges = [r for method, _, r in hub.requests if method == "GET" and r]
    assert ranges and int(ranges[0].split("=")[1].split("-")[0]) > 0, hub.requests


def test_modelscope_resumes_the_partial_file_of_an_earlier_run(hub, tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.bin.part").write_bytes(CONTENT[:100_000])
    (path,) = download.download_models(["tiny"], tmp_path, sources=["ModelScope"], progress=False)
    assert path.read_bytes() == CONTENT
    body_gets = [r for method, p, r in hub.requests if method == "GET" and "FilePath" in p]
    assert body_gets == ["bytes=100000-"]


@pytest.mark.parametrize("source", SOURCES)
def test_corrupted_body_is_detected_and_nothing_is_left(hub, tmp_path, source):
    hub.corrupt = True
    with pytest.raises(VidsynthError, match="corrupted download.*sha256") as info:
        download.download_models(["tiny"], tmp_path, sources=[source], progress=False)
    assert str((tmp_path / "tiny" / "model.bin").resolve()) in str(info.value)
    assert not (tmp_path / "tiny" / "model.bin").exists()
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == []  # no .part, no staging folder


def test_table_size_that_disagrees_with_the_server_is_an_error(hub, tmp_path, monkeypatch):
    table = json.loads(json.dumps(TABLE))
    table["presets"]["tiny"]["files"][0]["size"] = len(CONTENT) + 1
    monkeypatch.setattr(download, "presets", lambda: download.parse_presets(table))
    with pytest.raises(VidsynthError, match=f"states size {len(CONTENT)}, the preset table {len(CONTENT) + 1}"):
        download.download_models(["tiny"], tmp_path, progress=False)
    assert not (tmp_path / "tiny" / "model.bin").exists()


def test_first_source_failing_falls_back_to_the_second(hub, tmp_path, caplog):
    hub.failing = {"HuggingFace"}
    with caplog.at_level(logging.WARNING, logger="vidsynth.download"):
        (path,) = download.download_models(["tiny"], tmp_path)  # with progress bars
    assert path.read_bytes() == CONTENT
    assert "HuggingFace could not deliver tiny/model.bin" in caplog.text and "500" in caplog.text
    assert "trying ModelScope" in caplog.text
    assert any("FilePath=model.bin" in p for _, p, _ in hub.requests)


def test_offline_fails_fast_naming_the_urls_and_where_to_put_the_file(tmp_path, isolated):
    start = time.monotonic()
    with pytest.raises(VidsynthError) as info:
        download.download_models(["tiny"], tmp_path, progress=False)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert f"{isolated}/org/tiny/resolve/main/model.bin" in message
    assert f"{isolated}/api/v1/models/ms-org/tiny/repo" in message
    assert "by hand" in message and str((tmp_path / "tiny" / "model.bin").resolve()) in message


def test_unknown_name_lists_close_matches(monkeypatch, capsys):
    monkeypatch.setattr(download, "presets", SHIPPED_PRESETS)
    with pytest.raises(ConfigError, match="AnimateDiff_xl_beta"):
        download.download_models(["AnimateDiff_xl_bta"])
    assert download.run_cli(["StableDiffusionXL_v2"], False, "models") == 2  # bad input, as in the other commands
    assert "StableDiffusionXL_v1" in capsys.readouterr().err


MODELSCOPE_ONLY = {"stable_diffusion/dreamshaper_8.safetensors", "stable_diffusion/flat2DAnimerge_v45Sharp.safetensors"}


def test_shipped_table_is_well_formed_and_has_the_example_names(monkeypatch, capsys):
    monkeypatch.setattr(download, "presets", SHIPPED_PRESETS)
    table = download.presets()
    unique = list(dict.fromkeys(table.values()))
    by_path: dict[str, download.PresetFile] = {}
    for preset in unique:
        assert preset.about and preset.files
        for file in preset.files:
            # DiffSynth's two civitai fine-tunes are mirrored on ModelScope only
            assert file.remote("HuggingFace") or file.path in MODELSCOPE_ONLY, \
                f"{file.path}: every supported model is on Hugging Face"
            assert file.size or file.approx_size, f"{file.path}: --list needs a size"
            assert by_path.setdefault(file.path, file) == file, f"{file.path} is described twice, differently"
            for remote in file.remotes:
                assert unquote(download.download_url(remote)).endswith(remote.file)
    hf_files = {f.remote("HuggingFace").file for f in by_path.values() if f.remote("HuggingFace")}
    motion_loras = {f"v2_lora_{m}.ckpt" for m in ("ZoomIn", "ZoomOut", "PanLeft", "PanRight", "TiltUp", "TiltDown",
                                                  "RollingClockwise", "RollingAnticlockwise")}
    lightning = {f"animatediff_lightning_{n}step_comfyui.safetensors" for n in (1, 2, 4, 8)}
    assert {"v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors", "mm_sd_v14.ckpt", "mm_sd_v15.ckpt",
            "mm_sd_v15_v2.ckpt", "v3_sd15_mm.ckpt", "v3_sd15_adapter.ckpt", "mm_sdxl_v10_beta.ckpt",
            "AnimateLCM_sd15_t2v.ckpt", "vocab.json", "merges.txt"} | motion_loras | lightning <= hf_files
    example = download.resolve(["StableDiffusionXL_v1", "AnimateDiff_xl_beta"])
    assert [f.path for p in example for f in p.files] == [
        "stable_diffusion_xl/sd_xl_base_1.0.safetensors", "AnimateDiff/mm_sdxl_v10_beta.ckpt"]
    assert [f.remote("HuggingFace").repo for p in example for f in p.files] == [
        "stabilityai/stable-diffusion-xl-base-1.0", "guoyww/animatediff"]
    assert download.run_cli([], True, "models") == 0
    listing = capsys.readouterr().out
    assert all(p.name in listing for p in unique) and "AnimateDiff_xl_beta" in listing and "GB" in listing


@pytest.mark.parametrize("file, problem", [
    ({"path": "/abs/x.bin", "HuggingFace": "a/b"}, "plain relative path"),
    ({"path": "../x.bin", "HuggingFace": "a/b"}, "plain relative path"),
    ({"path": "x.bin"}, "no source"),
    ({"path": "x.bin", "HuggingFace": "not-a-repo"}, "owner/name"),
    ({"path": "x.bin", "HuggingFace": "a/b", "sha256": "ABC"}, "sha256"),
    ({"path": "x.bin", "HuggingFace": "a/b", "size": -1}, "positive"),
    ({"path": "x.bin", "HuggingFace": "a/b", "url": "http://x"}, "unknown keys"),
])
def test_malformed_table_entries_are_rejected(file, problem):
    with pytest.raises(ConfigError, match=problem):
        download.parse_presets({"presets": {"bad": {"about": "x", "files": [file]}}})


def test_duplicate_names_and_unknown_includes_are_rejected():
    good = {"about": "x", "files": [{"path": "x.bin", "HuggingFace": "a/b"}]}
    with pytest.raises(ConfigError, match="used twice"):
        download.parse_presets({"presets": {"one": {**good, "aliases": ["two"]}, "two": good}})
    with pytest.raises(ConfigError, match="unknown presets"):
        download.parse_presets({"presets": {"one": {**good, "include": ["three"]}}})
