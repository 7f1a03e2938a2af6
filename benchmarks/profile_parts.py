"""torch.profiler tables of one denoise step (UNet + motion modules, CFG batch) or one decoder call, ours or
diffusers', on the random full-size files of benchmarks/generate.py (not a test).

    python benchmarks/profile_parts.py unet --impl ours --dtype bfloat16          # batch 2 x 8 frames at 32x32 latents
    python benchmarks/profile_parts.py decoder --impl diffusers --dtype bfloat16  # 8 frames 32x32 -> 256x256
    python benchmarks/profile_parts.py unet --impl ours --time 3                  # wall time of 3 calls, no profiler
    python benchmarks/profile_parts.py decoder --frames 16 --batch-size 4 --time 2  # ours: 4 frames per decoder call
    python benchmarks/profile_parts.py unet --compile                             # ours compiled as pipe.compile()
                                                                                  # does (the warm-up call compiles)
    python benchmarks/profile_parts.py unet --flops --impl diffusers              # FLOPs of one call per op, and
                                                                                  # what the call ran at (GFLOP/s)

One warm-up call, then the measured call(s); the table is sorted by self CPU time (top --rows ops).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch

from _measure import REPO, SHARED, current_rss, ensure_checkpoint, peak_rss, reset_peak_rss
from generate import FILES, PROMPT  # noqa: F401  (same files as the end-to-end benchmark)


def inputs(frames: int, size: int, dtype: torch.dtype, family: str):
    g = torch.Generator().manual_seed(0)
    n = 2 * frames
    x = torch.randn(n, 4, size // 8, size // 8, generator=g)
    tokens, dim = (77, 2048) if family == "sdxl" else (77, 768)
    context = torch.randn(2, tokens, dim, generator=g).repeat_interleave(frames, dim=0)  # uncond | cond, per frame
    y = torch.randn(2, 2816, generator=g).repeat_interleave(frames, dim=0) if family == "sdxl" else None
    return x.to(dtype), torch.full((n,), 501.0), context.to(dtype), None if y is None else y.to(dtype)


def ours_call(part: str, base, motion, dtype, frames, size, family, batch_size=None, compile=False):
    from vidsynth import ModelManager

    if part == "decoder":  # the VAE alone (160 MB), not the whole file
        from vidsynth.checkpoints import load_checkpoint
        from vidsynth.manager import build_component

        ckpt, info = load_checkpoint(base)
        vae = build_component(ckpt, info.component("vae"), dtype=dtype, device=torch.device("cpu"))
        z = torch.randn(frames, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)) / 0.18215
        return lambda: vae.decode(z, tile=False, batch_size=batch_size)  # None: the byte budget decides
    manager = ModelManager(torch_dtype=dtype, device="cpu")
    manager.load_models([base, motion])
    unet, mm = manager.unet, manager.motion_modules
    del manager
    if compile:
        unet.compile_blocks(dynamic=False)  # what pipe.compile() does
    x, t, context, y = inputs(frames, size, dtype, family)
    return lambda: unet(x, t, context, y, num_frames=frames, motion=mm)


def diffusers_call(part: str, base, motion, dtype, frames, size, family):
    from _reference import load_components, load_motion_adapter, motion_unet

    work = REPO / ".bench"
    parts = load_components(base, family, dtype, work)
    if part == "decoder":
        vae = parts["vae"]
        del parts
        z = (torch.randn(frames, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)) / 0.18215)
        return lambda: vae.decode(z.to(dtype)).sample
    unet = motion_unet(parts["unet"], load_motion_adapter(motion, family, dtype, work))
    del parts
    x, t, context, y = inputs(frames, size, dtype, family)
    x5 = x.reshape(2, frames, *x.shape[1:]).transpose(1, 2)  # (b, c, f, h, w)
    ctx = context  # per frame, as diffusers' AnimateDiff pipelines repeat the prompt embeddings
    extra = {}
    if y is not None:
        extra = {"added_cond_kwargs": {"text_embeds": y[::frames, :1280], "time_ids": y[::frames, 1280:1286]}}
    return lambda: unet(x5, t[:1], encoder_hidden_states=ctx, **extra).sample


def print_flops(call) -> None:
    """torch's FLOP counter, taught the two CPU ops it does not know: oneDNN's fused linear (ours) and the CPU flash
    attention (both); then one timed call, for the rate the whole call ran at."""
    from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

    def linear_flops(x, *args, out_shape=None, **kwargs):  # shapes, not tensors; x is the input in both overloads
        return 2 * math.prod(x) * out_shape[-1]

    def attention_flops(q, k, *args, out_shape=None, **kwargs):
        return 4 * math.prod(q) * k[-2]

    for op, formula in ((torch.ops.mkldnn._linear_pointwise, linear_flops),
                        (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, attention_flops)):
        if op not in torch.utils.flop_counter.flop_registry:
            register_flop_formula(op)(formula)
    counter = FlopCounterMode(display=False)
    with counter:
        call()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    counts = counter.get_flop_counts()["Global"]
    for op, n in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"{str(op):60s} {n / 1e12:7.3f} TFLOP")
    total = counter.get_total_flops()
    print(f"{'total':60s} {total / 1e12:7.3f} TFLOP in {seconds:.2f} s = {total / seconds / 1e9:.0f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["unet", "decoder"])
    parser.add_argument("--impl", choices=["ours", "diffusers"], default="ours")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--sdxl", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--time", type=int, default=0, help="time this many calls instead of profiling")
    parser.add_argument("--batch-size", type=int, help="ours, decoder: frames per decoder call (default: the budget)")
    parser.add_argument("--compile", action="store_true", help="ours, unet: compiled as pipe.compile() does")
    parser.add_argument("--flops", action="store_true", help="count the FLOPs of one call per op instead")
    parser.add_argument("--workdir", default=str(REPO / ".bench"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    family = "sdxl" if args.sdxl else "sd15"
    from pathlib import Path
    base, motion = (ensure_checkpoint(Path(args.workdir), name, dt) for name, dt in FILES[family])
    dtype = getattr(torch, args.dtype)
    if args.batch_size and (args.impl, args.part) != ("ours", "decoder"):
        parser.error("--batch-size applies to --impl ours decoder only")
    if args.compile and (args.impl, args.part) != ("ours", "unet"):
        parser.error("--compile applies to --impl ours unet only")
    setting = (args.part, base, motion, dtype, args.frames, args.size, family)
    call = (ours_call(*setting, batch_size=args.batch_size, compile=args.compile) if args.impl == "ours"
            else diffusers_call(*setting))
    from vidsynth.runtime import reusing_freed_memory

    # ours: the heap switch held across the calls, as the pipeline holds it across its sampler loop
    held = reusing_freed_memory() if (args.impl, args.part) == ("ours", "unet") else contextlib.nullcontext()
    with torch.inference_mode(), held:
        start = time.perf_counter()
        call()
        print(f"warm-up call: {time.perf_counter() - start:.2f} s", flush=True)
        if args.flops:
            return print_flops(call)
        if args.time:
            times, before, exact = [], current_rss(), reset_peak_rss()
            for _ in range(args.time):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            grown = (peak_rss() - before) / 2**20  # what the calls added on top of the loaded weights
            print(f"{args.impl} {args.part} {args.dtype}: " + " ".join(f"{s:.2f}" for s in times) + " s, peak RSS "
                  f"+{grown:.0f} MiB over the weights" + ("" if exact else " (process peak: no per-phase reset)"),
                  flush=True)
            return
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    print(f"shared: {SHARED}", flush=True)
    main()
