"""A local stand-in for the Hugging Face file server: serves given bytes at /{repo}/resolve/{revision}/{file} with
the headers huggingface_hub reads (commit, sha256 etag, size) and byte ranges. Loopback only; never the internet."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml


class ModelHub:
    def __init__(self, files: dict[tuple[str, str], bytes]):
        self.files = {(repo, name): data for (repo, name), data in files.items()}
        self.requests: list[tuple[str, str]] = []
        hub = self
        handler = type("Handler", (BaseHTTPRequestHandler,), {
            "do_GET": lambda self: hub._handle(self, head=False),
            "do_HEAD": lambda self: hub._handle(self, head=True),
            "log_message": lambda self, *args: None,
        })
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = req.path.split("?")[0]
        self.requests.append((req.command, path))
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        data = self.files.get((repo, rest.partition("/")[2]))  # any revision: huggingface_hub pins the commit
        if data is None:
            return req.send_error(404, "no such file")
        start = int(req.headers["Range"].split("=")[1].split("-")[0]) if req.headers.get("Range") else 0
        sha = hashlib.sha256(data).hexdigest()
        req.send_response(206 if start else 200)
        headers = {"X-Repo-Commit": "a" * 40, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "Content-Length": str(len(data) - start), "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        if not head:
            req.wfile.write(data[start:])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def preset_table(path: Path, entries: dict[str, tuple[list[str], str, str, str]]) -> Path:
    """Write a VIDSYNTH_PRESETS table: name -> (aliases, path under models/, repo, file), Hugging Face only."""
    table = {"presets": {name: {"about": f"test {name}", "aliases": aliases,
                                "files": [{"path": target, "HuggingFace": {"repo": repo, "file": file}}]}
                         for name, (aliases, target, repo, file) in entries.items()}}
    path.write_text(yaml.safe_dump(table))
    return path
