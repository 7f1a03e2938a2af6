"""The ``vidsynth`` command: generate, inspect, download, train."""
from __future__ import annotations

import argparse
import json
import re
import sys
from .errors import ConfigError, VidsynthError


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


def _keyframe(text: str) -> tuple[int, str]:
    index, sep, image = text.partition(":")
    try:
        if not sep or not image:
            raise ValueError
        return int(index), image
    except ValueError:
        raise argparse.ArgumentTypeError(f"a keyframe looks like INDEX:IMAGE (e.g. 0:first.png or -1:last.png), got "
                                         f"{text!r}") from None


def _control(text: str) -> tuple[str, str, float]:
    """FILE:PROCESSOR[:SCALE] (the file may itself contain ':')."""
    head, _, last = text.rpartition(":")
    scale = 1.0
    try:
        scale = float(last)
        head, _, last = head.rpartition(":")
    except ValueError:
        pass
    if not head or not last:
        raise argparse.ArgumentTypeError(f"--control takes FILE:PROCESSOR[:SCALE], e.g. "
                                         f"control_v11p_sd15_lineart.pth:lineart:0.8; got {text!r}")
    return head, last, scale


def parse_prompt_at(items: list[str], prompt: str | None = None) -> dict[int, str]:
    """Repeated ``--prompt-at FRAME:TEXT`` as a prompt-travel dict; ``--prompt`` (if given) is frame 0's text."""
    keyed = {0: prompt} if prompt else {}
    for item in items:
        frame, sep, text = item.partition(":")
        if not sep or not frame.strip().isdigit() or not text.strip():
            raise ConfigError(f"--prompt-at takes FRAME:TEXT (e.g. --prompt-at '24:a fox asleep'), got {item!r}")
        if int(frame) in keyed:
            raise ConfigError(f"--prompt-at: frame {int(frame)} has two prompts (--prompt is frame 0)")
        keyed[int(frame)] = text.strip()
    return dict(sorted(keyed.items()))


def parse_options(flag: str, text: str) -> dict:
    """``--free-noise noise_type=repeat_context,context_stride=2`` as a dict (values read as YAML scalars); an empty
    text (the flag alone) is the defaults."""
    import yaml

    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} takes KEY=VALUE[,KEY=VALUE...] (e.g. {flag} method=gaussian,num_iters=2), "
                              f"got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def parse_motion_scale(items: list[str]) -> float | dict[int, float] | None:
    """Repeated ``--motion-scale`` as one number (``1.2``) or keyframes (``0:1.0 32:1.3``)."""
    if not items:
        return None
    try:
        if len(items) == 1 and ":" not in items[0]:
            return float(items[0])
        keyed = {}
        for item in items:
            frame, sep, value = item.partition(":")
            if not sep:
                raise ValueError
            keyed[int(frame)] = float(value)
        return dict(sorted(keyed.items()))
    except ValueError:
        raise ConfigError(f"--motion-scale takes one SCALE or repeated FRAME:SCALE (e.g. --motion-scale 0:1.0 "
                          f"--motion-scale 32:1.3), got {' '.join(items)!r}") from None


DEFAULT_BASE, DEFAULT_MOTION = "StableDiffusion_v15", {"sd15": "AnimateDiff_v2", "sdxl": "AnimateDiff_xl_beta"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidsynth", description="AnimateDiff video generation on SD 1.5 / SDXL files")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text to video", description=(
        "Text to video. With no model arguments it uses SD 1.5 and the AnimateDiff v2 motion module, downloading "
        "them into the models folder on first use."))
    gen.add_argument("--base", help=f"SD 1.5 or SDXL single-file checkpoint, or a preset name (default {DEFAULT_BASE})")
    gen.add_argument("--motion", help="AnimateDiff motion module file or preset name (default: AnimateDiff_v2 for an "
                                      "SD 1.5 base, AnimateDiff_xl_beta for SDXL)")
    gen.add_argument("--motion-version", help="force the motion-module version (v1, v2, v3, sdxl_beta, animatelcm, lightning)")
    gen.add_argument("--lora", action="append", default=None, type=_lora, metavar="FILE[:ALPHA]",
                     help="LoRA, MotionLoRA or domain adapter (file or preset); repeatable")
    gen.add_argument("--prompt")
    gen.add_argument("--prompt-at", action="append", default=[], metavar="FRAME:TEXT",
                     help="prompt travel: the prompt from this frame on (repeatable; frame 0 or --prompt starts it)")
    gen.add_argument("--negative", default=None)
    gen.add_argument("--frames", type=int, default=None, help="default 16")
    gen.add_argument("--steps", type=int, default=None, help="default: the motion module's original setting")
    gen.add_argument("--cfg", type=float, default=None, help="default: the motion module's original setting")
    gen.add_argument("--seed", type=int, default=None, help="default 0")
    gen.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default 512x512, SDXL 1024x1024)")
    gen.add_argument("--sampler", default=None, help="ddim, euler, euler_a, dpmpp_2m, lcm (default: the module's)")
    gen.add_argument("--input", metavar="VIDEO_OR_IMAGE", help="start from this video (its first --frames frames) or "
                     "image (animated): video-to-video / image-to-video")
    gen.add_argument("--strength", type=float, default=None, help="with --input: how much to change it, in (0, 1] "
                     "(default 0.6; 1 starts from pure noise)")
    gen.add_argument("--context-length", type=int, default=None)
    gen.add_argument("--context-overlap", type=int, default=None, help="default 4")
    gen.add_argument("--loop", action="store_true", default=None, help="closed loop: the last frames blend into the first")
    gen.add_argument("--free-noise", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                     help="FreeNoise for long videos (windows inside the motion modules, rescheduled noise); options "
                          "as diffusers' enable_free_noise: context_length, context_stride, weighting_scheme, "
                          "noise_type")
    gen.add_argument("--free-init", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                     help="FreeInit re-noising iterations; options as diffusers' enable_free_init: num_iters, "
                          "method, order, spatial_stop_frequency, temporal_stop_frequency, use_fast_sampling")
    gen.add_argument("--motion-scale", action="append", default=[], metavar="SCALE|FRAME:SCALE",
                     help="motion-module strength: one number, or keyframes (repeat FRAME:SCALE) moving linearly")
    gen.add_argument("--fps", type=float, default=None, help="default 16")
    gen.add_argument("--control", action="append", default=[], type=_control, metavar="FILE:PROCESSOR[:SCALE]",
                     help="ControlNet file, preprocessor (none, tile, canny, lineart) and scale; repeatable")
    gen.add_argument("--control-frames", metavar="VIDEO", help="video (or frame folder) the ControlNets follow, one "
                                                               "frame per output frame; --frames defaults to its length")
    gen.add_argument("--recipe", metavar="VIDEO", help="render again from the recipe stored in a vidsynth video; other "
                                                        "options given override the recipe's")
    gen.add_argument("--models-dir", default=None, help="where presets are found and downloaded to (default "
                                                        "$VIDSYNTH_MODELS_DIR or ./models)")
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                     help="default: float16 on cuda; on cpu bfloat16 where the CPU runs it natively "
                          "(AMX / AVX-512 BF16), float32 elsewhere")
    gen.add_argument("--compile", action="store_true", help="torch.compile the UNet with the motion modules: "
                     "the first call compiles for over a minute, later bfloat16 steps on CPU are ~7%% faster")
    gen.add_argument("--ip-adapter", metavar="FILE", help="IP-Adapter file (ip-adapter_sd15.bin / ip-adapter_sdxl.bin); "
                     "its image encoder is read from --ip-encoder, default image_encoder/model.safetensors next to it")
    gen.add_argument("--ip-encoder", metavar="FILE", help="the IP-Adapter's CLIP image encoder file")
    gen.add_argument("--ip-image", action="append", default=None, metavar="IMG", help="image prompt (repeatable)")
    gen.add_argument("--ip-scale", type=float, default=None, help="IP-Adapter scale (default 1.0)")
    gen.add_argument("--sparsectrl", metavar="FILE", help="SparseCtrl file (v3_sd15_sparsectrl_rgb / _scribble.ckpt)")
    gen.add_argument("--keyframe", action="append", default=None, type=_keyframe, metavar="INDEX:IMAGE",
                     help="SparseCtrl keyframe at a frame index, negative from the end (repeatable; write "
                     "--keyframe=-1:IMG for a negative index)")
    gen.add_argument("-o", "--output", required=True, help=".mp4, .webm, .gif, .webp, or a folder for PNG frames")

    anim = commands.add_parser("animate", help="run a prompt config of the original AnimateDiff repository")
    anim.add_argument("config", help="YAML prompt config (configs/prompts/... of guoyww/AnimateDiff)")
    # the original fills only missing W/H/L from its flags; here a flag given also replaces the config's value
    anim.add_argument("--W", type=int, default=None, help="width (default: the entry's W, else 512)")
    anim.add_argument("--H", type=int, default=None, help="height (default: the entry's H, else 512)")
    anim.add_argument("--L", type=int, default=None, help="frames (default: the entry's L, else 16)")
    anim.add_argument("--steps", type=int, default=None, help="sampling steps (default: the entry's steps)")
    anim.add_argument("--format", choices=["gif", "mp4", "webm", "webp"], default="gif")
    anim.add_argument("--fps", type=float, default=8.0, help="default 8, as the original saves")
    anim.add_argument("--output-dir", default=None, help="default samples/{config name}-{time}, as the original")
    anim.add_argument("--models-dir", default=None, help="where an empty dreambooth_path finds SD 1.5 (default "
                                                         "$VIDSYNTH_MODELS_DIR or ./models)")
    anim.add_argument("--device", default=None)
    anim.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])

    insp = commands.add_parser("inspect", help="say what a checkpoint file is, or how a vidsynth video was made")
    insp.add_argument("file")
    insp.add_argument("--motion-version", default=None)
    insp.add_argument("--json", action="store_true")

    down = commands.add_parser("download", help="download preset models")
    down.add_argument("names", nargs="*")
    down.add_argument("--list", action="store_true", help="list the presets")
    down.add_argument("--models-dir", default=None, help="default $VIDSYNTH_MODELS_DIR or ./models")

    ui = commands.add_parser("ui", help="the web UI (needs `pip install vidsynth[ui]`)")
    ui.add_argument("--models-dir", default=None, help="folder the model pickers list (default $VIDSYNTH_MODELS_DIR or "
                                                       "./models)")
    ui.add_argument("--outputs-dir", default=None, help="where videos are written (default outputs/)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--device", default=None)
    ui.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])

    train = commands.add_parser("train", help="train a domain adapter, motion module or MotionLoRA")
    train.add_argument("stage", choices=["domain-adapter", "motion-module", "motion-lora"])
    train.add_argument("--config", required=True, help="YAML training configuration")
    return parser


def generate_recipe(args):
    """The Recipe ``vidsynth generate`` renders: the stored one (--recipe) with the options given on top, or the
    options with their defaults; model arguments located (presets downloaded) before anything is loaded."""
    from dataclasses import replace

    from .download import locate_models
    from .recipe import Recipe, find_model
    from .render import model_refs

    given = {"prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed, "sampler": args.sampler,
             "steps": args.steps, "cfg_scale": args.cfg, "frames": args.frames, "fps": args.fps,
             "motion_version": args.motion_version, "context_length": args.context_length,
             "context_overlap": args.context_overlap, "closed_loop": args.loop, "strength": args.strength,
             "motion_scale": parse_motion_scale(args.motion_scale)}
    for name in ("free_noise", "free_init"):
        if getattr(args, name) is not None:
            given[name] = parse_options("--" + name.replace("_", "-"), getattr(args, name))
    _check_long_video_options(given)
    if args.input:
        from .recipe import ModelRef

        given["input"] = ModelRef.of(args.input)
        if args.strength is None:
            given["strength"] = 0.6
    elif args.strength is not None:
        raise ConfigError("--strength applies to --input (the video or image to start from); give --input too")
    if args.control or args.control_frames:
        given.update(control_recipe_fields(args))
    if args.size:
        given["width"], given["height"] = args.size
    if args.prompt_at:
        given["prompt"] = parse_prompt_at(args.prompt_at, args.prompt)
    given = {k: v for k, v in given.items() if v is not None}
    if args.recipe:
        from .render import read_recipe

        recipe = read_recipe(args.recipe)
        models_dir = args.models_dir
        if args.base is None and args.motion is None and args.lora is None:
            base = find_model(recipe.base, models_dir, "base model")
            motion = recipe.motion and find_model(recipe.motion, models_dir, "motion module")
            loras = [(find_model(lora, models_dir, "LoRA"), lora.alpha) for lora in recipe.loras]
            if "controlnets" not in given:
                given["controlnets"] = tuple(replace(ref, path=str(find_model(ref, models_dir, "ControlNet")))
                                             for ref in recipe.controlnets)
                given["control_frames"] = recipe.control_frames and replace(
                    recipe.control_frames, path=str(find_model(recipe.control_frames, models_dir, "control video")))
            return replace(recipe, **given, base=replace(recipe.base, path=str(base)),
                           motion=recipe.motion and replace(recipe.motion, path=str(motion)),
                           loras=tuple(replace(ref, path=str(path)) for ref, (path, _) in zip(recipe.loras, loras)))
        recipe = replace(recipe, **given)
    else:
        if not given.get("prompt"):
            raise ConfigError("--prompt is required (or --recipe VIDEO to render a video's recipe again)")
        recipe = Recipe(**{**{"negative_prompt": "", "frames": 16, "seed": 0, "context_overlap": 4, "fps": 16.0},
                           **given})
    base, motion = _locate_base_and_motion(args.base, args.motion, args.models_dir)
    loras = args.lora or []
    lora_paths = locate_models([path for path, _ in loras], args.models_dir, what="vidsynth generate")
    return replace(recipe, **model_refs(base, motion, [(p, a) for p, (_, a) in zip(lora_paths, loras)]))


def _check_long_video_options(given: dict) -> None:
    """Bad --free-noise / --free-init options are refused before any model is loaded (the motion module's native
    length is checked later, once it is known)."""
    from .pipelines.free_init import FreeInit
    from .pipelines.free_noise import FreeNoise

    if "free_noise" in given:
        FreeNoise.parse(given["free_noise"], native_length=1 << 20)
    if "free_init" in given:
        FreeInit.parse(given["free_init"])


def control_recipe_fields(args) -> dict:
    """--control FILE:PROCESSOR[:SCALE] (repeatable) and --control-frames VIDEO as recipe fields; without --frames
    the video's frame count."""
    from .recipe import ModelRef
    from .video_io import load_video

    if not (args.control and args.control_frames):
        raise ConfigError("--control and --control-frames go together: the ControlNet file(s) and the video they "
                          "follow")
    fields = {"controlnets": tuple(ModelRef.of(path, scale, processor) for path, processor, scale in args.control),
              "control_frames": ModelRef.of(args.control_frames)}
    if args.frames is None:
        fields["frames"] = len(load_video(args.control_frames))
    return fields


def _locate_base_and_motion(base: str | None, motion: str | None, models_dir: str | None):
    from .checkpoints import load_checkpoint
    from .download import locate_models

    what = "vidsynth generate"
    if base is None:  # the one-command first run: both defaults fetched (or reported missing) together
        return tuple(locate_models([DEFAULT_BASE, motion or DEFAULT_MOTION["sd15"]], models_dir, what=what))
    (base_path,) = locate_models([base], models_dir, what=what)
    if motion is None:
        _, info = load_checkpoint(base_path)
        motion = DEFAULT_MOTION.get(info.family or "sd15", DEFAULT_MOTION["sd15"])
    (motion_path,) = locate_models([motion], models_dir, what=what)
    return base_path, motion_path


def cmd_generate(args) -> int:
    from .render import ModelSession, render, save

    session = ModelSession(args.device, args.dtype, compile=args.compile)
    recipe = generate_recipe(args)
    options = image_condition_options(args, recipe, session)
    frames, done = render(recipe, session, pipeline_options=options)
    out = save(frames, args.output, done)
    print(f"wrote {out}")
    return 0


def image_condition_options(args, recipe, session) -> dict:
    """Pipeline call arguments for --ip-adapter/--ip-image and --sparsectrl/--keyframe; their model files are loaded
    into the session's ModelManager first (these inputs are not part of the stored recipe)."""
    from pathlib import Path

    from PIL import Image

    if bool(args.ip_adapter) != bool(args.ip_image):
        raise ConfigError("--ip-adapter and --ip-image go together: the adapter file and at least one image prompt")
    if bool(args.sparsectrl) != bool(args.keyframe):
        raise ConfigError("--sparsectrl and --keyframe go together: the SparseCtrl file and at least one keyframe")
    if not args.ip_adapter and not args.sparsectrl:
        return {}
    open_image = lambda path: Image.open(path).convert("RGB")  # noqa: E731
    options, files = {}, []
    if args.ip_adapter:
        encoder = args.ip_encoder or Path(args.ip_adapter).parent / "image_encoder" / "model.safetensors"
        if not Path(encoder).is_file():
            raise ConfigError(f"{encoder}: no image encoder there; pass --ip-encoder FILE (models/image_encoder/"
                              "model.safetensors for SD 1.5, sdxl_models/image_encoder/model.safetensors for SDXL)")
        files += [args.ip_adapter, str(encoder)]
        options.update(ipadapter_images=[open_image(p) for p in args.ip_image],
                       ipadapter_scale=1.0 if args.ip_scale is None else args.ip_scale)
    if args.sparsectrl:
        files.append(args.sparsectrl)
        options.update(sparsectrl_images=[open_image(p) for _, p in args.keyframe],
                       sparsectrl_frame_indices=[i for i, _ in args.keyframe])
    session.pipeline(recipe.base.path, recipe.motion.path if recipe.motion else None, (), recipe.motion_version)
    session.manager.load_models(files)
    return options


def cmd_animate(args) -> int:
    from .configs import run_config

    outputs = run_config(args.config, width=args.W, height=args.H, frames=args.L, steps=args.steps,
                         video_format=args.format, fps=args.fps, output_dir=args.output_dir,
                         models_dir=args.models_dir, device=args.device, dtype=args.dtype)
    for path in outputs:
        print(f"wrote {path}")
    return 0


def cmd_ui(args) -> int:
    from .ui import launch

    launch(models_dir=args.models_dir, outputs_dir=args.outputs_dir, host=args.host, port=args.port,
           device=args.device, dtype=args.dtype)
    return 0


VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".webp")


def cmd_inspect(args) -> int:
    from pathlib import Path

    from .checkpoints import load_checkpoint

    path = Path(args.file)
    if path.suffix.lower() in VIDEO_SUFFIXES or path.is_dir():
        from .render import read_recipe

        recipe = read_recipe(path)
        print(json.dumps(recipe.to_dict(), indent=2) if args.json else recipe.describe())
        return 0

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
    from .download import default_models_dir
    return run_cli(args.names, args.list, args.models_dir or str(default_models_dir()))


def cmd_train(args) -> int:
    from .train import run_from_config
    run_from_config(args.stage, args.config)
    return 0


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--keyframe -1:last.png`` as ``--keyframe=-1:last.png``: argparse takes a value starting with '-' for an
    option unless it is a plain negative number."""
    out = []
    for arg in argv:
        if out and out[-1] in ("--keyframe", "--motion-scale") and re.match(r"-\d", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(_attach_negative_values(sys.argv[1:] if argv is None else list(argv)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = {"generate": cmd_generate, "animate": cmd_animate, "inspect": cmd_inspect, "download": cmd_download,
               "ui": cmd_ui, "train": cmd_train}
    try:
        return handler[args.command](args)
    except VidsynthError as err:
        print(f"vidsynth: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
