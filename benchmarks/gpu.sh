#!/usr/bin/env bash
# The GPU benchmark of issue 16: SD 1.5 + mm_sd_v15_v2, 512x512, 16 frames, 25 DDIM steps, float16, ours then
# diffusers, each in its own process; prints seconds per phase, it/s, peak VRAM and MFU. Writes the random
# full-size files once into .bench/ (about 4 GB). Untested here (no GPU was lent to this work); fits in 10 minutes
# on an A100/H100-class card. Extra arguments go to generate.py (e.g. --peak-tflops 312).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 600 python benchmarks/generate.py --gpu "$@"
