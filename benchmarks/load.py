"""Load time and peak RSS: the full-size SD 1.5 single file into UNet + VAE + CLIP-L, ours vs diffusers (not a test).

    python benchmarks/load.py [--workdir .bench] [--dtype float16 float32] [--device cpu] [--repeats 1]
    python benchmarks/load.py --motion --dtype bfloat16    # + mm_sd_v15_v2.ckpt (float32 pickle), as generate loads

The file is a random float16 file in the exact layout of v1-5-pruned-emaonly.safetensors, written once by
../shared/tools/make_checkpoint.py into --workdir. Each load runs in a fresh process (its own peak RSS; the file may
sit in the page cache for all of them alike: one untimed read primes it first).
ours:      vidsynth.ModelManager(torch_dtype, device).load_models([file] (+ [motion]))
diffusers: UNet2DConditionModel / AutoencoderKL.from_single_file(checkpoint, original_config=v1-inference.yaml)
           and CLIPTextModel through diffusers' create_diffusers_clip_model_from_ldm, the file read once (offline);
           --motion: + MotionAdapter.from_single_file (the adapter alone: assembling UNetMotionModel adds no weights).
"touch" then reads every weight once: a same-dtype diffusers load leaves tensors memory-mapped, so they are not
resident (and not read from the page cache) until first used; peak RSS counts the mapped pages once touched.
Target (issue 3): our peak RSS <= 1.3x the weights in the target dtype, and faster than diffusers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _measure import REPO, Phases, ensure_checkpoint, print_table, run_isolated

MANIFEST = "v1-5-pruned-emaonly.safetensors"
MOTION = "mm_sd_v15_v2.ckpt"


def weight_bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def touch(phases: Phases, modules) -> None:
    """Read every weight once. A tensor left memory-mapped from the file (same dtype as stored) is not resident until
    used, so a load that only maps looks cheap; this phase makes both contenders pay for what the first forward reads."""
    with phases("touch"):
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.sum()


def ours(path: str, dtype: str, device: str, motion: str | None = None) -> None:
    torch.set_grad_enabled(False)
    phases = Phases(device)
    from vidsynth import ModelManager

    with phases("load"):
        manager = ModelManager(torch_dtype=getattr(torch, dtype), device=device)
        manager.load_models([path] + ([motion] if motion else []))
    touch(phases, manager.models.values())
    phases.report(weights=weight_bytes(manager.models.values()), parts=sorted(manager.models))


def diffusers(path: str, dtype: str, device: str, workdir: str, motion: str | None = None) -> None:
    torch.set_grad_enabled(False)
    phases = Phases(device)
    from _reference import load_components, load_motion_adapter

    with phases("load"):
        parts = load_components(path, "sd15", getattr(torch, dtype), Path(workdir))
        if motion:
            parts["motion_adapter"] = load_motion_adapter(motion, "sd15", getattr(torch, dtype), Path(workdir))
        for module in parts.values():
            module.to(device)
    touch(phases, parts.values())
    phases.report(weights=weight_bytes(parts.values()), parts=sorted(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench", help="where the random file is cached")
    parser.add_argument("--dtype", nargs="+", default=["float16", "float32"], choices=["float16", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="loads per contender and dtype; the fastest is shown")
    parser.add_argument("--motion", action="store_true", help=f"load {MOTION} too (a float32 pickled .ckpt)")
    args = parser.parse_args()

    path = ensure_checkpoint(args.workdir, MANIFEST, "float16")
    motion = ensure_checkpoint(args.workdir, MOTION) if args.motion else None
    for file in filter(None, (path, motion)):
        with open(file, "rb") as f:  # prime the page cache so neither contender pays the first disk read
            while f.read(1 << 26):
                pass
        print(f"{file} ({file.stat().st_size / 2**30:.2f} GiB)")
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in args.dtype:
        runs = {name: [run_isolated(__file__, name, path=str(path), dtype=dtype, device=args.device,
                                    motion=motion and str(motion),
                                    **({"workdir": str(args.workdir)} if name == "diffusers" else {}))
                       for _ in range(args.repeats)] for name in ("ours", "diffusers")}
        best = {name: min(results, key=lambda r: r["phases"]["load"]["s"]) for name, results in runs.items()}
        o, d = best["ours"], best["diffusers"]
        weights = o["weights"]
        print_table(f"{dtype} on {args.device}: {', '.join(o['parts'])}", [
            ("load time", o["phases"]["load"]["s"], d["phases"]["load"]["s"], "s"),
            ("then reading every weight", o["phases"]["touch"]["s"], d["phases"]["touch"]["s"], "s"),
            ("peak RSS during load", o["phases"]["load"]["rss"], d["phases"]["load"]["rss"], "bytes"),
            ("process wall time (+import)", o["wall_s"], d["wall_s"], "s"),
            ("peak RSS (process)", o["peak_rss"], d["peak_rss"], "bytes"),
            ("weights in memory", weights, d["weights"], "bytes")], results=(o, d))
        print(f"our peak RSS / weights = {o['peak_rss'] / weights:.2f} (target <= 1.3); "
              f"diffusers {d['peak_rss'] / d['weights']:.2f}")
        if "gpu" in o["phases"]["load"]:
            print(f"peak GPU memory: ours {o['phases']['load']['gpu'] / 2**30:.2f} GiB, "
                  f"diffusers {d['phases']['load']['gpu'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
