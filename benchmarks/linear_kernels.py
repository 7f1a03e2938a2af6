"""torch's F.linear (MKL's sgemm in float32) against oneDNN's fused linear (what vidsynth's CPU inference calls), on
the SD 1.5 UNet's projection shapes at 256x256 with CFG over 8 frames (not a test).

    python benchmarks/linear_kernels.py                     # float32 and bfloat16
    python benchmarks/linear_kernels.py --dtype float32

Per shape (tokens x in -> out): milliseconds of a plain biased projection and of one with a residual add, then the
ratio F.linear / oneDNN (above 1: oneDNN faster). Both run with freed memory kept in the heap, as the sampler runs.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vidsynth.models.layers import _LINEAR_POINTWISE as FUSED
from vidsynth.runtime import reusing_freed_memory

# tokens = 16 images x latent pixels (32x32, 16x16, 8x8); in -> out of to_q/k/v/out, GEGLU, ff out
SHAPES = [(16384, 320, 320), (16384, 320, 2560), (16384, 1280, 320), (4096, 640, 640), (4096, 640, 5120),
          (4096, 2560, 640), (1024, 1280, 1280), (1024, 1280, 10240), (1024, 5120, 1280)]


def seconds(call, repeats: int) -> float:
    for _ in range(2):
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], action="append")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.inference_mode(), reusing_freed_memory():
        for dtype in [getattr(torch, d) for d in args.dtype or ["float32", "bfloat16"]]:
            print(f"{str(dtype)[6:]:>8}  tokens x in -> out      F.linear  oneDNN  ratio"
                  " | +residual: F.linear  oneDNN  ratio")
            for m, k, n in SHAPES:
                x, w, b, r = (torch.randn(*s).to(dtype) for s in ((m, k), (n, k), (n,), (m, n)))
                plain = seconds(lambda: F.linear(x, w, b), args.repeats), \
                    seconds(lambda: FUSED(x, w, b, "none", [], ""), args.repeats)
                residual = seconds(lambda: F.linear(x, w, b).add_(r), args.repeats), \
                    seconds(lambda: FUSED.binary(x, r, w, b, "add"), args.repeats)
                cells = [f"{theirs * 1e3:8.1f} {ours * 1e3:7.1f} {theirs / ours:6.2f}"
                         for theirs, ours in (plain, residual)]
                print(f"{'':8}  {m:6d} x {k:4d} -> {n:5d}  " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
