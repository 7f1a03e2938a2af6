"""Long videos: time and peak RSS of 16 / 64 / 160 frames, plain windows vs FreeNoise vs FreeInit (not a test).

    flock /tmp/vidsynth-bigmem.lock python benchmarks/long_video.py                   # SD 1.5, CPU bf16, 128x128
    python benchmarks/long_video.py --frames 16 64 --modes plain free_noise --steps 2

Weights: random full-size v1-5-pruned-emaonly.safetensors (float16) + mm_sd_v15_v2.ckpt in their real layouts,
written once into --workdir by ../shared/tools/make_checkpoint.py; nothing is downloaded. Each (frames, mode) runs
in its own process (load, then text+denoise+decode to numpy frames) so each peak RSS is its own.
  plain       our whole-UNet context windows (16 frames, overlap 4)
  free_noise  free_noise=dict() (diffusers' defaults: windows of 16 by 4 inside the motion modules, shuffled noise);
              the UNet sees all frames at once, as diffusers' FreeNoise does
  free_init   free_init=dict(num_iters=2) over the plain windows (each iteration is a whole sampler loop)
Memory should stay flat in the frame count beyond the window: the decoder and the windows see a bounded batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from _measure import REPO, Phases, ensure_checkpoint, gib, run_isolated

PROMPT = "a corgi running on a beach at sunset, waves, golden light, highly detailed"
MODES = {"plain": {}, "free_noise": {"free_noise": {}}, "free_init": {"free_init": {"num_iters": 2}}}


def worker(base: str, motion: str, dtype: str, size: int, frames: int, steps: int, mode: str) -> None:
    torch.set_grad_enabled(False)
    phases = Phases("cpu")
    from vidsynth import ModelManager, SDVideoPipeline

    with phases("load"):
        manager = ModelManager(torch_dtype=getattr(torch, dtype), device="cpu")
        manager.load_models([base, motion])
        pipe = SDVideoPipeline.from_model_manager(manager)
    with phases("generate"):
        pipe(PROMPT, negative_prompt="blurry", height=size, width=size, num_frames=frames, num_inference_steps=steps,
             seed=0, output_type="np", progress_bar=False, **MODES[mode])
    phases.report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 160])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workdir", default=str(REPO / ".bench"), help="where the random files are cached")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    base = ensure_checkpoint(workdir, "v1-5-pruned-emaonly.safetensors", "float16")
    motion = ensure_checkpoint(workdir, "mm_sd_v15_v2.ckpt")
    print(f"sd15 cpu {args.dtype} {args.size}x{args.size}, {args.steps} DDIM steps, torch {torch.__version__}",
          flush=True)
    print(f"{'frames':>6s} {'mode':>11s} {'generate':>10s} {'s/frame':>8s} {'peak RSS':>10s} {'load avg':>10s}")
    for frames in args.frames:
        for mode in args.modes:
            r = run_isolated(__file__, "worker", base=str(base), motion=str(motion), dtype=args.dtype,
                             size=args.size, frames=frames, steps=args.steps, mode=mode)
            seconds = r["phases"]["generate"]["s"]
            print(f"{frames:6d} {mode:>11s} {seconds:9.1f}s {seconds / frames:8.2f} "
                  f"{gib(r['phases']['generate']['rss']):>10s} {'{:.1f}..{:.1f}'.format(*r['load_avg']):>10s}",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
