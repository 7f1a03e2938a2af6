"""Denoising-step time with and without an IP-Adapter and with SparseCtrl, ours vs diffusers (not a test).

    python benchmarks/ip_adapter.py                      # CPU bfloat16, 256x256, 8 frames, CFG batch, 3 timed steps
    python benchmarks/ip_adapter.py --device cuda --dtype float16 --size 512 --frames 16

Weights: random full-size files in the layouts of v1-5-pruned-emaonly.safetensors (float16), mm_sd_v15_v2.ckpt (v3's
per-step cost plus its mid-block module), ip-adapter_sd15.bin and v3_sd15_sparsectrl_rgb.ckpt, written once into
--workdir by ../shared/tools/make_checkpoint.py.
One step = what the pipeline runs per sampler step for one context window under CFG: the UNet (+ motion modules) on
the (2 x frames) batch; with the IP-Adapter its 4 image tokens ride along; with SparseCtrl its residuals are computed
first (two RGB keyframes) and added. Each contender in its own process; median of --steps timed steps after one
warm-up step.
ours:      ModelManager.load_models([...]); attach_ip_adapter; SparseControlNet residuals -> UNet(control=...)
diffusers: UNet2DConditionModel.from_single_file -> UNetMotionModel (benchmarks/_reference.py);
           _load_ip_adapter_weights (what load_ip_adapter does); SparseControlNetModel with the file's weights renamed
           as diffusers' conversion script renames them (motion GroupNorm pooled over frames, as diffusers does).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _measure import REPO, ensure_checkpoint, print_table, run_isolated

FILES = {"base": ("v1-5-pruned-emaonly.safetensors", "float16"), "motion": ("mm_sd_v15_v2.ckpt", None),
         "ip_adapter": ("ip-adapter_sd15.bin", None), "sparsectrl": ("v3_sd15_sparsectrl_rgb.ckpt", None)}
MODES = ("plain", "ip_adapter", "sparsectrl")


def inputs(frames: int, size: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    h = size // 8
    x = torch.randn(2 * frames, 4, h, h, generator=g).to(dtype)
    text = torch.randn(2, 77, 768, generator=g).to(dtype)
    embeds = torch.randn(1, 1024, generator=g).to(dtype)
    cond = torch.zeros(frames, 4, h, h, dtype=dtype)
    mask = torch.zeros(frames, 1, h, h, dtype=dtype)
    cond[[0, -1]] = torch.randn(2, 4, h, h, generator=g).to(dtype)
    mask[[0, -1]] = 1
    return x, text, embeds, cond, mask


def timed(step, steps: int) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def ours(files: dict, mode: str, device: str, dtype: str, size: int, frames: int, steps: int) -> None:
    torch.set_grad_enabled(False)
    from vidsynth import ModelManager
    from vidsynth.ip_adapter import attach_ip_adapter

    torch_dtype = getattr(torch, dtype)
    manager = ModelManager(torch_dtype=torch_dtype, device=device)
    manager.load_models([files["base"], files["motion"]] + ([files[mode]] if mode != "plain" else []))
    unet, motion = manager.unet, manager.motion_modules
    x, text, embeds, cond, mask = (t.to(device) for t in inputs(frames, size, torch_dtype))
    context = text.repeat_interleave(frames, 0)
    t = torch.tensor(501.0, device=device)
    run = lambda ctx, **kw: unet(x, t, ctx, num_frames=frames, motion=motion, **kw)  # noqa: E731
    if mode == "plain":
        times = timed(lambda: run(context), steps)
    elif mode == "ip_adapter":
        adapter = manager.ip_adapter
        tokens = torch.cat([adapter.negative_tokens(embeds), adapter.image_tokens(embeds)]).repeat_interleave(frames, 0)
        with attach_ip_adapter(unet, adapter, 1.0):
            times = timed(lambda: run(torch.cat([context, tokens.to(context.dtype)], dim=1)), steps)
    else:
        sparse = manager.sparsectrl
        c, m = cond.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1, 1)
        times = timed(lambda: run(context, control=sparse(x, c, m, t, context, frames)), steps)
    print("@@result " + json.dumps({"median_s": statistics.median(times), "times": times}), flush=True)


def to_diffusers_sparsectrl(state: dict) -> dict:
    """The original file's names -> diffusers' SparseControlNetModel's (its conversion script's renames)."""
    out = {}
    for key, value in state.items():
        if ".motion_modules." in key:
            key = (key.replace(".temporal_transformer.", ".").replace(".attention_blocks.0.pos_encoder.", ".pos_embed.")
                   .replace(".attention_blocks.0.", ".attn1.").replace(".norms.0.", ".norm1.")
                   .replace(".ff_norm.", ".norm3."))
        out[key] = value
    return out


def diffusers(files: dict, mode: str, device: str, dtype: str, size: int, frames: int, steps: int,
              workdir: str) -> None:
    torch.set_grad_enabled(False)
    from _reference import load_components, load_motion_adapter, motion_unet

    from vidsynth.checkpoints import Checkpoint

    torch_dtype = getattr(torch, dtype)
    parts = load_components(files["base"], "sd15", torch_dtype, Path(workdir))
    unet = motion_unet(parts.pop("unet"), load_motion_adapter(files["motion"], "sd15", torch_dtype, Path(workdir)))
    del parts
    unet = unet.to(device)
    x, text, embeds, cond, mask = (t.to(device) for t in inputs(frames, size, torch_dtype))
    sample = x.reshape(2, frames, *x.shape[1:]).transpose(1, 2)  # (b, c, f, h, w)
    t = torch.tensor(501, device=device)
    text = text.repeat_interleave(frames, 0)  # UNetMotionModel takes the text per frame, as the pipeline passes it
    kwargs = {}
    if mode == "ip_adapter":
        state = Checkpoint(files["ip_adapter"]).state_dict(dtype=torch_dtype)
        nested = {outer: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(outer + ".")}
                  for outer in ("image_proj", "ip_adapter")}
        unet._load_ip_adapter_weights(nested)
        unet.to(device, torch_dtype)
        kwargs["added_cond_kwargs"] = {"image_embeds": [torch.cat([torch.zeros_like(embeds), embeds])[:, None]]}
    if mode == "sparsectrl":
        from diffusers import SparseControlNetModel
        state = to_diffusers_sparsectrl(Checkpoint(files["sparsectrl"]).state_dict(dtype=torch_dtype))
        net = SparseControlNetModel(conditioning_channels=4, use_simplified_condition_embedding=True,
                                    motion_max_seq_length=32).to(torch_dtype)
        net.load_state_dict(state, strict=True)
        net = net.to(device).eval()
        c5, m5 = cond.transpose(0, 1)[None], mask.transpose(0, 1)[None]

        def step():
            down, mid = net(sample, t, text, c5, conditioning_mask=m5, return_dict=False)
            return unet(sample, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid)
    else:
        def step():
            return unet(sample, t, encoder_hidden_states=text, **kwargs)
    times = timed(step, steps)
    print("@@result " + json.dumps({"median_s": statistics.median(times), "times": times}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--only", choices=["ours", "diffusers"])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench")
    args = parser.parse_args()
    files = {name: str(ensure_checkpoint(args.workdir, file, dtype)) for name, (file, dtype) in FILES.items()}
    setting = f"SD 1.5 + v2 {args.device} {args.dtype} {args.size}x{args.size} {args.frames} frames, CFG batch"
    print(f"{setting}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results: dict[tuple[str, str], dict] = {}
    for mode in MODES:
        for name in (args.only,) if args.only else ("ours", "diffusers"):
            kwargs = dict(files=files, mode=mode, device=args.device, dtype=args.dtype, size=args.size,
                          frames=args.frames, steps=args.steps)
            if name == "diffusers":
                kwargs["workdir"] = str(args.workdir)
            results[mode, name] = run_isolated(__file__, name, **kwargs)
            print(f"{mode} {name}: {json.dumps(results[mode, name])}", file=sys.stderr, flush=True)
    get = lambda mode, name: results.get((mode, name), {}).get("median_s")  # noqa: E731
    labels = {"plain": "step (UNet + motion)", "ip_adapter": "step + IP-Adapter", "sparsectrl": "step + SparseCtrl"}
    rows = [(labels[mode], get(mode, "ours"), get(mode, "diffusers"), "s") for mode in MODES]
    print_table(setting, rows, results=(results.get(("plain", "ours")), results.get(("plain", "diffusers"))))
    for mode in MODES[1:]:
        if get(mode, "ours") and get("plain", "ours"):
            print(f"{labels[mode]}: ours +{get(mode, 'ours') / get('plain', 'ours') - 1:.0%} over plain"
                  + (f", diffusers +{get(mode, 'diffusers') / get('plain', 'diffusers') - 1:.0%}"
                     if get(mode, "diffusers") and get("plain", "diffusers") else ""))


if __name__ == "__main__":
    main()
