"""The ``vidsynth`` command: generate, inspect, download, train."""
from __future__ import annotations

import argparse
import json
import sys
from .errors import VidsynthError


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None
    return width, height


def _lora(text: str) -> tuple[str, float]:
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidsynth", description="AnimateDiff video generation on SD 1.5 / SDXL files")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text to video")
    gen.add_argument("--base", required=True, help="SD 1.5 or SDXL single-file checkpoint")
    gen.add_argument("--motion", help="AnimateDiff motion module file")
    gen.add_argument("--motion-version", help="force the motion-module version (v1, v2, v3, sdxl_beta, animatelcm, lightning)")
    gen.add_argument("--lora", action="append", default=[], type=_lora, metavar="FILE[:ALPHA]",
                     help="LoRA, MotionLoRA or domain adapter; repeatable")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default="")
    gen.add_argument("--frames", type=int, default=16)
    gen.add_argument("--steps", type=int, default=None, help="default: the motion module's original setting")
    gen.add_argument("--cfg", type=float, default=None, help="default: the motion module's original setting")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default 512x512, SDXL 1024x1024)")
    gen.add_argument("--sampler", default=None, help="ddim, euler, euler_a, dpmpp_2m, lcm (default: the module's)")
    gen.add_argument("--context-length", type=int, default=None)
    gen.add_argument("--context-overlap", type=int, default=4)
    gen.add_argument("--loop", action="store_true", help="closed loop: the last frames blend into the first")
    gen.add_argument("--fps", type=float, default=16)
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                     help="default: float16 on cuda, float32 on cpu")
    gen.add_argument("-o", "--output", required=True, help=".mp4, .gif, .webp, or a folder for PNG frames")

    insp = commands.add_parser("inspect", help="say what a checkpoint file is")
    insp.add_argument("file")
    insp.add_argument("--motion-version", default=None)
    insp.add_argument("--json", action="store_true")

    down = commands.add_parser("download", help="download preset models")
    down.add_argument("names", nargs="*")
    down.add_argument("--list", action="store_true", help="list the presets")
    down.add_argument("--models-dir", default="models")

    train = commands.add_parser("train", help="train a domain adapter, motion module or MotionLoRA")
    train.add_argument("stage", choices=["domain-adapter", "motion-module", "motion-lora"])
    train.add_argument("--config", required=True, help="YAML training configuration")
    return parser


def cmd_generate(args) -> int:
    import torch

    from . import ModelManager, save_video

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device == "cuda" else torch.float32)
    manager = ModelManager(torch_dtype=dtype, device=device)
    manager.load_models([args.base], motion_version=args.motion_version)
    if args.motion:
        manager.load_models([args.motion], motion_version=args.motion_version)
    for path, alpha in args.lora:
        manager.load_lora(path, lora_alpha=alpha)
    if manager.family == "sdxl":
        from . import SDXLVideoPipeline as Pipeline
    else:
        from . import SDVideoPipeline as Pipeline
    pipe = Pipeline.from_model_manager(manager)
    width, height = args.size or ((1024, 1024) if manager.family == "sdxl" else (512, 512))
    video = pipe(prompt=args.prompt, negative_prompt=args.negative, cfg_scale=args.cfg, height=height, width=width,
                 num_frames=args.frames, num_inference_steps=args.steps, seed=args.seed, sampler=args.sampler,
                 context_length=args.context_length, context_overlap=args.context_overlap, closed_loop=args.loop)
    out = save_video(video, args.output, fps=args.fps)
    print(f"wrote {out}")
    return 0


def cmd_inspect(args) -> int:
    from .checkpoints import load_checkpoint

    _, info = load_checkpoint(args.file, motion_version=args.motion_version)
    description = info.describe()
    if args.json:
        print(json.dumps(description, indent=2, default=str))
        return 0
    print(f"{description['path']}\n  kind: {description['kind']}  family: {description['family']}  "
          f"tensors: {description['tensors']}  dtype: {description['dtype']}")
    for note in description["notes"]:
        print(f"  note: {note}")
    for name, component in description["components"].items():
        print(f"  {name} (prefix {component['prefix']!r})")
        for key, value in (component["config"] or {}).items():
            print(f"    {key}: {value}")
    return 0


def cmd_download(args) -> int:
    from .download import run_cli
    return run_cli(args.names, args.list, args.models_dir)


def cmd_train(args) -> int:
    from .train import run_from_config
    run_from_config(args.stage, args.config)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "inspect": cmd_inspect, "download": cmd_download, "train": cmd_train}
    try:
        return handler[args.command](args)
    except VidsynthError as err:
        print(f"vidsynth: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
