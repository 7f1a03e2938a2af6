"""ControlNet in the video pipelines, with DiffSynth-Studio 1.x's surface: ``ControlNetConfigUnit``,
``from_model_manager(model_manager, controlnet_config_units=[...])``, ``controlnet_frames=`` at the call.

Each unit is one residual provider for the denoiser (see ``denoiser.ControlProvider``): per context window and step
it runs its ControlNet on the window's frames (classifier-free guidance batch included, as diffusers'
``AnimateDiffControlNetPipeline`` does) and scales the residuals by ``unit.scale * controlnet_conditioning_scale``;
the denoiser sums the units. ``control_guidance_start`` / ``control_guidance_end`` (fractions of the steps, diffusers'
names and rule) switch a unit off outside its span.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..models.controlnet import UNION_CONTROL_TYPES
from ..processors import PASS_THROUGH, Processor
from .frames import frames_tensor

CONTROL_OPTIONS = ("controlnet_frames", "controlnet_conditioning_scale", "control_guidance_start",
                   "control_guidance_end")


class ControlNetConfigUnit:
    """DiffSynth's unit: which preprocessor, which ControlNet file, how strongly. ``control_type`` (vidsynth): the
    SDXL union model's control type (name or index); by default taken from ``processor_id`` (canny / lineart: 3,
    tile: 6)."""

    def __init__(self, processor_id: str, model_path: str | Path, scale: float = 1.0, skip_processor: bool = False,
                 control_type: str | int | None = None):
        self.processor_id, self.model_path, self.scale = processor_id, model_path, scale
        self.skip_processor, self.control_type = skip_processor, control_type

    def __repr__(self) -> str:
        return f"ControlNetConfigUnit({self.processor_id!r}, {str(self.model_path)!r}, scale={self.scale})"


@dataclass
class ControlNetUnit:
    model: torch.nn.Module
    processor: Processor
    scale: float
    control_type: int | None
    path: str


def load_units(model_manager, config_units: Sequence[ControlNetConfigUnit], family: str) -> list[ControlNetUnit]:
    """The ControlNets of ``config_units`` from ``model_manager`` (loaded there if not yet), checked against the
    pipeline's family, each with its preprocessor."""
    units = []
    for unit in config_units:
        if not isinstance(unit, ControlNetConfigUnit):
            raise ConfigError(f"controlnet_config_units takes ControlNetConfigUnit objects, got {type(unit).__name__}")
        model = model_manager.fetch_controlnet(unit.model_path)
        if model.family != family:
            raise ConfigError(f"{unit.model_path}: a {model.family} ControlNet cannot control this {family} pipeline; "
                              f"use a {family} ControlNet")
        if isinstance(unit.scale, bool) or not isinstance(unit.scale, (int, float)):
            raise ConfigError(f"{unit!r}: scale must be a number, got {unit.scale!r}")
        control_type = _control_type(model, unit)
        processor = Processor("none" if unit.skip_processor else unit.processor_id, device=model_manager.device)
        units.append(ControlNetUnit(model, processor, float(unit.scale), control_type, str(unit.model_path)))
    return units


def _control_type(model, unit: ControlNetConfigUnit) -> int | None:
    config = model.controlnet_config
    if not config.union:
        return None
    chosen = unit.processor_id if unit.control_type is None else unit.control_type
    index = UNION_CONTROL_TYPES.get(chosen) if isinstance(chosen, str) else chosen
    if not isinstance(index, int) or not 0 <= index < config.num_control_types:
        names = ", ".join(sorted(UNION_CONTROL_TYPES))
        raise ConfigError(f"{unit.model_path} is a union ControlNet: say which control type the frames are with "
                          f"ControlNetConfigUnit(..., control_type=NAME or 0-{config.num_control_types - 1}); "
                          f"names: {names}; got {chosen!r}")
    return index


@dataclass(frozen=True)
class ControlRequest:
    """The call's control inputs, checked: per unit its (f, 3, H, W) frames in [0, 1] before preprocessing, scale,
    and guidance span."""
    frames: tuple[torch.Tensor, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]


def _per_unit(value, n: int, name: str) -> tuple[float, ...]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{name} must be a number or one number per ControlNet unit ({n}), got {value!r}")
    return tuple(float(v) for v in values)


def control_request(units: Sequence[ControlNetUnit], options: dict, *, height, width,
                    num_frames: int | None) -> ControlRequest | None:
    """Pop the control arguments from ``options`` and check them against the units, before any compute."""
    if not units:
        # controlnet_conditioning_scale is left for SparseCtrl (diffusers' name for its scale there too)
        stray = [k for k in CONTROL_OPTIONS if k in options and k != "controlnet_conditioning_scale"]
        if stray:
            raise ConfigError(f"{', '.join(stray)} given but the pipeline has no ControlNet; build it with "
                              "from_model_manager(model_manager, controlnet_config_units=[ControlNetConfigUnit(...)])")
        return None
    given = {k: options.pop(k) for k in CONTROL_OPTIONS if k in options}
    frames = given.get("controlnet_frames")
    if frames is None:
        raise ConfigError(f"the pipeline has {len(units)} ControlNet unit(s) and needs controlnet_frames (one list of "
                          "frames for every unit, or one list per unit)")
    if not (isinstance(height, int) and isinstance(width, int) and height % 8 == 0 and width % 8 == 0):
        return None  # the size check of the request reports the problem
    nested = isinstance(frames, (list, tuple)) and frames and all(isinstance(f, (list, tuple)) for f in frames)
    lists = list(frames) if nested else [frames] * len(units)
    if len(lists) != len(units):
        raise ConfigError(f"controlnet_frames has {len(lists)} lists of frames for {len(units)} ControlNet units; "
                          "pass one list for all units or one per unit")
    tensors = []
    for i, frame_list in enumerate(lists):
        name = "controlnet_frames" + (f"[{i}]" if nested else "")
        tensor = (frames_tensor(frame_list, height, width, name=name) + 1) / 2  # resized with a logged note
        if num_frames is not None and len(tensor) != num_frames:
            raise ConfigError(f"{name} has {len(tensor)} frames but num_frames={num_frames}; pass one control frame "
                              "per video frame")
        tensors.append(tensor)
    starts = _per_unit(given.get("control_guidance_start", 0.0), len(units), "control_guidance_start")
    ends = _per_unit(given.get("control_guidance_end", 1.0), len(units), "control_guidance_end")
    for start, end in zip(starts, ends):
        if not 0 <= start < end <= 1:
            raise ConfigError(f"control_guidance_start/end must satisfy 0 <= start < end <= 1, got {start}, {end}")
    scales = _per_unit(given.get("controlnet_conditioning_scale", 1.0), len(units), "controlnet_conditioning_scale")
    return ControlRequest(tuple(tensors), scales, starts, ends)


class ControlNetProvider:
    """One unit's residuals per window and step (``denoiser.ControlProvider``)."""

    def __init__(self, unit: ControlNetUnit, hints: torch.Tensor, scale: float, start: float, end: float,
                 steps: int, first_step: int = 0):
        self.unit, self.hints, self.scale = unit, hints, scale
        self.start, self.end, self.steps, self.first_step = start, end, steps, first_step

    def active(self, step: int) -> bool:
        # diffusers' controlnet_keep over the steps that run (video-to-video starts late): off while
        # i / n < start or (i + 1) / n > end
        i, n = step - self.first_step, self.steps - self.first_step
        return not (i / n < self.start or (i + 1) / n > self.end) and self.scale != 0

    def residuals(self, x, t, context, y, frames, step):
        if not self.active(step):
            return None
        n_cond = x.shape[0] // len(frames)
        hint = self.hints[torch.as_tensor(frames, device=self.hints.device)].repeat(n_cond, 1, 1, 1)
        down, mid = self.unit.model(x, hint, t, context, y, control_type=self.unit.control_type)
        return [d * self.scale for d in down], mid * self.scale


def preprocess(unit: ControlNetUnit, frames: torch.Tensor) -> torch.Tensor:
    """The unit's processor on every frame: (f, 3, H, W) in [0, 1] -> the control images, same shape."""
    if unit.processor.processor_id in PASS_THROUGH:
        return frames
    images = [Image.fromarray(a) for a in (frames * 255).round().byte().permute(0, 2, 3, 1).numpy()]
    processed = np.stack([np.asarray(unit.processor(image)) for image in images])
    return torch.from_numpy(processed).permute(0, 3, 1, 2).float() / 255


def providers(pipe, units: Sequence[ControlNetUnit], request: ControlRequest, steps: int,
              first_step: int = 0) -> list[ControlNetProvider]:
    """The conditioning stage's part: frames preprocessed once per call, on the UNet's device and dtype."""
    result = []
    for unit, frames, scale, start, end in zip(units, request.frames, request.scales, request.starts, request.ends):
        hints = preprocess(unit, frames).to(pipe.device, pipe.dtype)
        result.append(ControlNetProvider(unit, hints, unit.scale * scale, start, end, steps, first_step))
    return result
