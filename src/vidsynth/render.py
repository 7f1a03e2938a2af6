"""Render a ``Recipe``: the one path from settings to a video file that the CLI, `vidsynth animate` and the web UI
share. ``ModelSession`` keeps the loaded models between renders and reloads only the files that change."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .errors import ConfigError
from .recipe import ModelRef, Recipe

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        from .runtime import default_dtype  # bfloat16 on CPUs that run it natively
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class ModelSession:
    """A ModelManager kept between renders: a new base file means a new manager, a new motion module replaces the
    old one, LoRAs are taken off and put on again (they are small). ``compile``: :meth:`VideoPipeline.compile`
    once per loaded base model (the compiled code is kept for the renders after it)."""

    def __init__(self, device: str | None = None, dtype: str | torch.dtype | None = None, compile: bool = False):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.compile = compile
        self.manager = None
        self._base: str | None = None
        self._motion: tuple[str | None, str | None] = (None, None)
        self._extra: set[str] = set()

    def pipeline(self, base: str | os.PathLike, motion: str | os.PathLike | None = None,
                 loras: list[tuple[str | os.PathLike, float]] = (), motion_version: str | None = None, *,
                 extra: list[str | os.PathLike] = (), controlnets=()):
        """The pipeline over these files; ``extra`` model files (SparseCtrl, IP-Adapter, ...) are loaded once and
        stay until the base changes; ``controlnets`` (ControlNetConfigUnit) become the pipeline's units (their files
        stay loaded, like ``extra``)."""
        from .manager import ModelManager

        base_key = os.path.realpath(base)
        if self.manager is None or self._base != base_key:
            self.manager, self._base, self._motion = None, None, (None, None)  # free the old models first
            manager = ModelManager(torch_dtype=self.dtype, device=self.device)
            manager.load_models([base], motion_version=motion_version)
            self.manager, self._base, self._extra = manager, base_key, set()
        manager = self.manager
        for path in extra:
            if os.path.realpath(path) not in self._extra:
                manager.load_models([path])
                self._extra.add(os.path.realpath(path))
        for lora in list(manager.loras):
            manager.remove_lora(lora)
        motion_key = (os.path.realpath(motion) if motion else None, motion_version)
        if motion_key != self._motion:
            if motion is None:
                manager.models.pop("motion_modules", None)
                manager.infos.pop("motion_modules", None)
            else:
                manager.load_models([motion], motion_version=motion_version)
            self._motion = motion_key
        for path, alpha in loras:
            manager.load_lora(path, lora_alpha=alpha)
        if manager.family == "sdxl":
            from .pipelines.sdxl_video import SDXLVideoPipeline as Pipeline
        else:
            from .pipelines.sd_video import SDVideoPipeline as Pipeline
        pipe = Pipeline.from_model_manager(manager, controlnet_config_units=controlnets)
        if self.compile and manager.unet.compiled_blocks is None:
            pipe.compile()
        return pipe


def render(recipe: Recipe, session: ModelSession, *, progress_bar: bool = True,
           on_step: Callable[[int, int], None] | None = None,
           pipeline_options: dict[str, Any] | None = None) -> tuple[list, Recipe]:
    """Frames (PIL images) of ``recipe``, and the recipe as rendered: defaults filled in, files hashed, version set.
    ``on_step(done, total)`` is called after every sampling step."""
    if recipe.base is None:
        raise ConfigError("the recipe names no base model")
    from .pipelines.controlnet import ControlNetConfigUnit

    if bool(recipe.controlnets) != (recipe.control_frames is not None):
        raise ConfigError("ControlNets and the control frames go together (--control FILE:PROCESSOR and "
                          "--control-frames VIDEO)")
    units = [ControlNetConfigUnit(ref.processor or "none", ref.path, 1.0 if ref.alpha is None else ref.alpha)
             for ref in recipe.controlnets]
    pipe = session.pipeline(recipe.base.path, recipe.motion.path if recipe.motion else None,
                            [(lora.path, 1.0 if lora.alpha is None else lora.alpha) for lora in recipe.loras],
                            recipe.motion_version, controlnets=units)
    defaults = pipe.default_sampling()
    side = 1024 if pipe.family == "sdxl" else 512
    done = replace(recipe, sampler=recipe.sampler or defaults["sampler"],
                   steps=recipe.steps if recipe.steps is not None else defaults["steps"],
                   cfg_scale=recipe.cfg_scale if recipe.cfg_scale is not None else defaults["cfg_scale"],
                   width=recipe.width or side, height=recipe.height or side, vidsynth_version=__version__)
    if done.input is not None:
        pipeline_options = {"input_frames": input_frames(done.input.path, done.frames),
                            "denoising_strength": done.strength, **(pipeline_options or {})}
    if done.control_frames is not None:
        from .video_io import load_video

        pipeline_options = {"controlnet_frames": load_video(done.control_frames.path, max_frames=done.frames),
                            **(pipeline_options or {})}
    if on_step is not None:
        pipeline_options = {"callback_on_step_end": lambda _pipe, step, _t, _state: on_step(step + 1, done.steps) or {},
                            **(pipeline_options or {})}
    frames = pipe(prompt=done.prompt, negative_prompt=done.negative_prompt, cfg_scale=done.cfg_scale,
                  height=done.height, width=done.width, num_frames=done.frames, num_inference_steps=done.steps,
                  seed=done.seed, sampler=done.sampler, context_length=done.context_length,
                  context_overlap=done.context_overlap, closed_loop=done.closed_loop, progress_bar=progress_bar,
                  motion_scale=done.motion_scale, free_noise=done.free_noise, free_init=done.free_init,
                  **done.sampler_options, **(pipeline_options or {}))
    return frames, done.hashed()


def input_frames(path: str | os.PathLike, frames: int) -> list:
    """The first ``frames`` frames of a video (or folder of frames), or one image repeated ``frames`` times."""
    from PIL import Image

    from .errors import VidsynthError
    from .video_io import IMAGE_SUFFIXES, load_video

    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as image:
                return [image.convert("RGB")] * frames
        except OSError as e:
            raise VidsynthError(f"{path}: cannot read the input image ({e})") from None
    video = load_video(path, max_frames=frames)
    if len(video) < frames:
        raise ConfigError(f"{path} has {len(video)} frames, fewer than the {frames} to render; pass --frames "
                          f"{len(video)} or a longer input")
    return video


def save(frames, path: str | os.PathLike, recipe: Recipe) -> Path:
    """Write the video with its recipe inside (see video_io.save_video's ``comment``)."""
    from .video_io import save_video

    return save_video(frames, path, fps=recipe.fps, comment=recipe.to_json())


def read_recipe(path: str | os.PathLike) -> Recipe:
    from .errors import VidsynthError
    from .video_io import read_comment

    text = read_comment(path)
    if not text:
        raise VidsynthError(f"{path}: holds no vidsynth recipe (it was not written by vidsynth, or its metadata was "
                            "stripped)")
    return Recipe.from_json(text, where=str(path))


def model_refs(base: Path, motion: Path | None, loras: list[tuple[Path, float]]) -> dict[str, Any]:
    """Recipe fields for located model files."""
    return {"base": ModelRef.of(base), "motion": ModelRef.of(motion) if motion else None,
            "loras": tuple(ModelRef.of(path, alpha) for path, alpha in loras)}

