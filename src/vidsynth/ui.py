"""`vidsynth ui`: a Gradio page over the same ``render`` / ``save`` as `vidsynth generate` (no second pipeline).

Models are picked from the models folder (each file identified by its tensors: base checkpoints, motion modules,
LoRAs / MotionLoRAs / domain adapters); every video is written into the outputs folder with its recipe inside, and
the gallery lists earlier outputs with their settings read back from the files. Needs ``pip install vidsynth[ui]``.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, VidsynthError

logger = logging.getLogger(__name__)
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".webp")
LORA_SLOTS = 3
MODULE_DEFAULT = "(the motion module's)"
NONE = "(none)"
LORA_KINDS = ("lora", "motion_lora", "domain_adapter")


@dataclass(frozen=True)
class ModelFiles:
    base: list[str]
    motion: list[str]
    lora: list[str]
    controlnet: list[str]


def scan_models(models_dir: Path) -> ModelFiles:
    """The model files under ``models_dir`` by what they hold (paths relative to it); unreadable files are skipped."""
    from .checkpoints import load_checkpoint

    found = {"base": [], "motion": [], "lora": [], "controlnet": []}
    for path in sorted(p for p in models_dir.rglob("*") if p.suffix.lower() in MODEL_SUFFIXES and p.is_file()):
        try:
            _, info = load_checkpoint(path)
        except (VidsynthError, OSError) as e:
            logger.info("models folder: skipping %s (%s)", path, e)
            continue
        kind = ("base" if info.kind in ("sd15", "sdxl") else "motion" if info.kind == "motion_module"
                else "lora" if info.kind.startswith(LORA_KINDS) else "controlnet" if info.kind == "controlnet"
                else None)
        if kind:
            found[kind].append(str(path.relative_to(models_dir)))
    return ModelFiles(**found)


def output_name(prompt: str, seed: int, suffix: str) -> str:
    words = re.sub(r"[^\w]+", "-", " ".join(prompt.split()[:6])).strip("-")[:60] or "video"
    return f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{seed}-{words}{suffix}"


def gallery(outputs_dir: Path) -> list[tuple[str, str]]:
    """Earlier outputs, newest first, each with its settings."""
    from .render import read_recipe

    items = []
    videos = [p for p in outputs_dir.glob("*") if p.suffix.lower() in VIDEO_SUFFIXES]
    for path in sorted(videos, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            recipe = read_recipe(path)
            caption = (f"{recipe.prompt} | seed {recipe.seed}, {recipe.sampler} {recipe.steps} steps, cfg "
                       f"{recipe.cfg_scale}, {recipe.width}x{recipe.height}, {recipe.frames} frames, "
                       f"{recipe.base.name if recipe.base else '?'}")
        except VidsynthError:
            caption = path.name
        items.append((str(path), caption))
    return items


class Studio:
    """The page's state and its one action: render a recipe from the form and write it."""

    def __init__(self, models_dir: Path, outputs_dir: Path, device: str | None, dtype: str | None):
        from .render import ModelSession

        self.models_dir, self.outputs_dir = models_dir, outputs_dir
        self.session = ModelSession(device, dtype)

    def generate(self, base, motion, *values, on_step=None):
        from .recipe import ModelRef, Recipe
        from .render import render, save

        lora_values, rest = values[:2 * LORA_SLOTS], values[2 * LORA_SLOTS:]
        (prompt, negative, sampler, steps, cfg, width, height, frames, seed, fps, context_length, context_overlap,
         loop, video_format, input_video, strength, controlnet, processor, control_scale, control_video) = rest
        if not base:
            raise ConfigError(f"pick a base model (none found in {self.models_dir}: put an SD 1.5 / SDXL checkpoint "
                              "there or run `vidsynth download sd-v1-5`)")
        if not prompt or not prompt.strip():
            raise ConfigError("write a prompt first")
        loras = tuple(ModelRef.of(self.models_dir / name, float(weight))
                      for name, weight in zip(lora_values[::2], lora_values[1::2]) if name and name != NONE)
        recipe = Recipe(prompt=prompt, negative_prompt=negative or "", seed=int(seed),
                        sampler=None if sampler == MODULE_DEFAULT else sampler, steps=int(steps) or None,
                        cfg_scale=float(cfg) or None, width=int(width), height=int(height), frames=int(frames),
                        fps=float(fps), base=ModelRef.of(self.models_dir / base),
                        motion=ModelRef.of(self.models_dir / motion) if motion and motion != NONE else None,
                        loras=loras, context_length=int(context_length) or None,
                        context_overlap=int(context_overlap), closed_loop=bool(loop),
                        input=ModelRef.of(input_video) if input_video else None, strength=float(strength),
                        **self.control_fields(controlnet, processor, control_scale, control_video))
        video, done = render(recipe, self.session, on_step=on_step)
        out = save(video, self.outputs_dir / output_name(prompt, done.seed, f".{video_format}"), done)
        return str(out), str(out), done.describe(), gallery(self.outputs_dir)

    def control_fields(self, controlnet, processor, scale, video) -> dict:
        from .recipe import ModelRef

        if not controlnet or controlnet == NONE:
            return {}
        if not video:
            raise ConfigError("a ControlNet follows a video: upload the control video too (or pick no ControlNet)")
        return {"controlnets": (ModelRef.of(self.models_dir / controlnet, float(scale), processor),),
                "control_frames": ModelRef.of(video)}


def takes(argument: str) -> bool:
    """Whether the video pipelines take ``argument`` (video-to-video and step callbacks came with the staged core)."""
    import inspect

    from .pipelines.core import VideoPipeline

    return argument in inspect.signature(VideoPipeline.__call__).parameters


def build_app(models_dir: str | os.PathLike | None = None, outputs_dir: str | os.PathLike | None = None, *,
              device: str | None = None, dtype: str | None = None):
    try:
        import gradio as gr
    except ImportError:
        raise VidsynthError("the web UI needs Gradio: pip install 'vidsynth[ui]'") from None
    from .download import default_models_dir
    from .processors import PROCESSOR_IDS
    from .sampling import SAMPLERS

    models = Path(models_dir) if models_dir is not None else default_models_dir()
    outputs = Path(outputs_dir) if outputs_dir is not None else Path("outputs")
    outputs.mkdir(parents=True, exist_ok=True)
    studio = Studio(models, outputs, device, dtype)

    files = scan_models(models) if models.is_dir() else ModelFiles([], [], [], [])

    def run(*values, progress=gr.Progress()):
        on_step = (lambda done, total: progress((done, total), desc="denoising")) if takes("callback_on_step_end") \
            else None
        try:
            return studio.generate(*values, on_step=on_step)
        except VidsynthError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # shown as a message; the traceback stays in the server's log
            logger.exception("generation failed")
            raise gr.Error(f"{type(e).__name__}: {e}") from None

    with gr.Blocks(title="vidsynth") as app:
        gr.Markdown(f"## vidsynth\nAnimateDiff text to video. Models from `{models}`, videos into `{outputs}`.")
        with gr.Row():
            with gr.Column(scale=1):
                base = gr.Dropdown(files.base, value=files.base[0] if files.base else None, label="Base model",
                                   elem_id="base")
                motion = gr.Dropdown([NONE, *files.motion], value=files.motion[0] if files.motion else NONE,
                                     label="Motion module", elem_id="motion")
                lora_inputs = []
                with gr.Accordion("LoRAs", open=False):
                    for i in range(LORA_SLOTS):
                        with gr.Row():
                            lora_inputs.append(gr.Dropdown([NONE, *files.lora], value=NONE, label=f"LoRA {i + 1}",
                                                           elem_id=f"lora{i}"))
                            lora_inputs.append(gr.Slider(-2, 2, value=0.8, step=0.05, label="weight",
                                                         elem_id=f"lora{i}_weight"))
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative")
                with gr.Row():
                    sampler = gr.Dropdown([MODULE_DEFAULT, *SAMPLERS], value=MODULE_DEFAULT, label="Sampler",
                                          elem_id="sampler")
                    steps = gr.Number(0, precision=0, minimum=0, label="Steps (0: the module's)", elem_id="steps")
                    cfg = gr.Number(0, minimum=0, label="CFG (0: the module's)", elem_id="cfg")
                with gr.Row():
                    width = gr.Number(512, precision=0, minimum=8, step=8, label="Width", elem_id="width")
                    height = gr.Number(512, precision=0, minimum=8, step=8, label="Height", elem_id="height")
                    frames = gr.Number(16, precision=0, minimum=1, label="Frames", elem_id="frames")
                    fps = gr.Number(16, minimum=1, label="fps", elem_id="fps")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    dice = gr.Button("Random seed", elem_id="random_seed")
                with gr.Accordion("Context windows (long videos)", open=False):
                    context_length = gr.Number(0, precision=0, minimum=0, label="Context length (0: the module's)",
                                               elem_id="context_length")
                    context_overlap = gr.Number(4, precision=0, minimum=0, label="Overlap", elem_id="context_overlap")
                    loop = gr.Checkbox(False, label="Closed loop", elem_id="loop")
                with gr.Accordion("Video to video", open=False, visible=takes("input_frames")):
                    input_video = gr.Video(label="Input video", sources=["upload"], elem_id="input_video")
                    strength = gr.Slider(0, 1, value=0.7, step=0.05, label="Strength (0 keeps it, 1 from noise)",
                                         elem_id="strength")
                with gr.Accordion("ControlNet", open=False, visible=bool(files.controlnet)):
                    controlnet = gr.Dropdown([NONE, *files.controlnet], value=NONE, label="ControlNet",
                                             elem_id="controlnet")
                    with gr.Row():
                        processor = gr.Dropdown(list(PROCESSOR_IDS), value="none", label="Preprocessor",
                                                elem_id="processor")
                        control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Scale", elem_id="control_scale")
                    control_video = gr.Video(label="Control video (its frames, one per output frame)",
                                             sources=["upload"], elem_id="control_video")
                video_format = gr.Radio(["mp4", "webm", "gif", "webp"], value="mp4", label="Format", elem_id="format")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                result = gr.Video(label="Video", elem_id="result", autoplay=True, loop=True)
                download = gr.File(label="Download", elem_id="download")
                settings = gr.Textbox(label="Recipe (stored in the file)", lines=8, elem_id="recipe")
        history = gr.Gallery(gallery(outputs), label="Earlier outputs", columns=6, height=300,
                             object_fit="contain", elem_id="gallery")

        dice.click(lambda: random.randrange(2**32), outputs=seed)
        go.click(run, inputs=[base, motion, *lora_inputs, prompt, negative, sampler, steps, cfg, width, height,
                              frames, seed, fps, context_length, context_overlap, loop, video_format, input_video,
                              strength, controlnet, processor, control_scale, control_video],
                 outputs=[result, download, settings, history])
    app.queue()
    app.vidsynth_paths = [str(outputs.resolve())]
    return app


def launch(models_dir=None, outputs_dir=None, *, host: str = "127.0.0.1", port: int = 7860, device=None, dtype=None,
           block: bool = True):
    app = build_app(models_dir, outputs_dir, device=device, dtype=dtype)
    app.launch(server_name=host, server_port=port, allowed_paths=app.vidsynth_paths, prevent_thread_lock=not block,
               footer_links=[], quiet=not block)
    return app
