"""Values given at keyframes (``{0: a, 24: b, 48: c}``), checked and interpolated to one per frame.

diffusers' rules for prompt dicts (``_check_inputs_free_noise``): keys are ints, the first is 0, the last is below
num_frames; between two keyframes the value moves linearly (``_lerp``, both ends included) and the last keyframe's
value holds to the end.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..errors import ConfigError

Interpolation = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(start_frame, end_frame, start (1, ...), end (1, ...)) -> (end_frame - start_frame + 1, ...)``, diffusers'
``prompt_interpolation_callback``."""


def check_keyframes(values: Mapping, num_frames: int, what: str, value_type: type | tuple[type, ...]) -> dict:
    """``values`` sorted by frame, after diffusers' checks; a vidsynth error naming ``what`` otherwise."""
    if not values:
        raise ConfigError(f"{what}: an empty dict; give at least {{0: ...}}")
    keys = list(values)
    bad = [k for k in keys if not isinstance(k, int) or isinstance(k, bool)]
    if bad:
        raise ConfigError(f"{what}: keyframe keys must be int frame indices, got {bad[0]!r}; write {{0: ..., 24: ...}}"
                          f" (the CLI takes FRAME:VALUE)")
    wrong = [v for v in values.values() if not isinstance(v, value_type) or isinstance(v, bool)]
    if wrong:
        names = value_type.__name__ if isinstance(value_type, type) else " or ".join(t.__name__ for t in value_type)
        raise ConfigError(f"{what}: keyframe values must be {names}, got {type(wrong[0]).__name__}")
    if min(keys) != 0:
        raise ConfigError(f"{what}: the first keyframe must be frame 0 (a value to start from), got {min(keys)}")
    if max(keys) >= num_frames:
        raise ConfigError(f"{what}: keyframe {max(keys)} is beyond the video's last frame {num_frames - 1} "
                          f"(frames count from 0); use keys below num_frames={num_frames}")
    return dict(sorted(values.items()))


def lerp(start_frame: int, end_frame: int, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """diffusers' ``_lerp``: alpha = i / (n - 1) over the n = end - start + 1 frames, both ends included."""
    alpha = torch.linspace(0, 1, end_frame - start_frame + 1, dtype=torch.float64) if end_frame > start_frame \
        else torch.zeros(1, dtype=torch.float64)
    alpha = alpha.to(start.device, start.dtype).reshape(-1, *[1] * (start.ndim - 1))
    return (1 - alpha) * start + alpha * end


def interpolate(keys: list[int], values: torch.Tensor, num_frames: int,
                interpolation: Interpolation | None = None) -> torch.Tensor:
    """``values`` (len(keys), ...) at sorted ``keys`` -> (num_frames, ...): segment by segment through
    ``interpolation`` (linear by default); the last keyframe's value holds to the last frame."""
    interpolation = interpolation or lerp
    if keys[-1] != num_frames - 1:
        keys, values = [*keys, num_frames - 1], torch.cat([values, values[-1:]])
    out = values.new_zeros((num_frames, *values.shape[1:]))
    out[0] = values[0]
    for i in range(len(keys) - 1):
        start, end = keys[i], keys[i + 1]
        segment = interpolation(start, end, values[i:i + 1], values[i + 1:i + 2])
        if segment.shape != (end - start + 1, *values.shape[1:]):
            raise ConfigError(f"the interpolation callback returned shape {tuple(segment.shape)} for frames "
                              f"{start}..{end}; it must return {(end - start + 1, *values.shape[1:])}")
        out[start:end + 1] = segment
    return out
