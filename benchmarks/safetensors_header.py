"""Reading a .safetensors header: our own JSON parser vs the safetensors package, and data read vs mapped.

``python benchmarks/safetensors_header.py``: the header of the SDXL base layout (2515 tensors, from ../shared) on a
sparse file of the real size, parsed 20 times each way; then the peak RSS of loading 512 MiB of float16 as float32
through ``safe_open(...).get_tensor`` (mapped) and through ``Checkpoint.tensor`` (readinto), each in a fresh process.
"""
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VIDSYNTH_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "src"))


def sparse_sdxl(path: Path) -> None:
    layout = json.loads((SHARED / "checkpoint-layouts" / "sd_xl_base_1.0.safetensors.json").read_text())
    header, offset = {}, 0
    for key, shape in layout["tensors"].items():
        dtype, size = ("I64", 8) if key in layout["dtype_overrides"] else ("F16", 2)
        n = size
        for s in shape:
            n *= s
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def headers(path: Path) -> None:
    from safetensors import safe_open

    def own_parser():  # what checkpoints.py did before: json.loads + its own checks
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(n))

    def safe_open_only():
        with safe_open(str(path), "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}

    def checkpoint():  # safe_open validates, json.loads gives the offsets
        from vidsynth.checkpoints import Checkpoint
        return Checkpoint(path).shapes

    for name, fn in (("json.loads alone (no checks)", own_parser), ("safe_open + get_slice shapes", safe_open_only),
                     ("Checkpoint (safe_open + json)", checkpoint)):
        fn()
        times = []
        for _ in range(20):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        print(f"{name:32s} median {sorted(times)[10] * 1e3:6.2f} ms")


def rss_child(mode: str, path: str) -> None:
    import torch
    out = []
    if mode == "safe_open":
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            out = [f.get_tensor(k).float() for k in f.keys()]
    else:
        from vidsynth.checkpoints import Checkpoint
        ckpt = Checkpoint(path)
        out = [ckpt.tensor(k, torch.float32) for k in ckpt.keys()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(f"{mode:10s} peak RSS {peak} MiB for {sum(t.numel() * 4 for t in out) >> 20} MiB of float32")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return rss_child(sys.argv[2], sys.argv[3])
    print(f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        sdxl = Path(tmp) / "sdxl.safetensors"
        sparse_sdxl(sdxl)
        headers(sdxl)
        sdxl.unlink()
        import torch
        from safetensors.torch import save_file
        big = Path(tmp) / "big.safetensors"
        save_file({f"w{i}": torch.zeros(8192, 8192, dtype=torch.float16) for i in range(4)}, str(big))
        for mode in ("safe_open", "readinto"):
            subprocess.run([sys.executable, __file__, "--child", mode, str(big)], check=True)


if __name__ == "__main__":
    main()
