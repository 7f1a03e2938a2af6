"""``motion_scale=`` over time: a number, one number per frame, or keyframes ``{0: 1.0, 32: 1.3}`` moving linearly
between them (as prompt travel; the last value holds). ComfyUI-AnimateDiff-Evolved calls such a value a scale
multival. A schedule becomes a ``(num_frames,)`` tensor; the pipeline hands each context window its frames' values."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import ConfigError
from .keyframes import check_keyframes, interpolate


def motion_scale_schedule(motion_scale: float | Sequence[float] | Mapping[int, float],
                          num_frames: int) -> float | torch.Tensor:
    """A float stays a float (no per-frame work); a list or keyframe dict becomes one value per frame."""
    if isinstance(motion_scale, (int, float)) and not isinstance(motion_scale, bool):
        return float(motion_scale)
    if isinstance(motion_scale, Mapping):
        keyed = check_keyframes(motion_scale, num_frames, "motion_scale", (int, float))
        values = torch.tensor(list(keyed.values()), dtype=torch.float32)
        return interpolate(list(keyed), values, num_frames)
    if isinstance(motion_scale, (Sequence, torch.Tensor)) and not isinstance(motion_scale, str):
        values = torch.as_tensor(motion_scale, dtype=torch.float32)
        if values.shape != (num_frames,):
            raise ConfigError(f"motion_scale as a list needs one value per frame ({num_frames}), got "
                              f"{tuple(values.shape)[0] if values.ndim == 1 else tuple(values.shape)}; or give "
                              f"keyframes {{0: 1.0, {num_frames - 1}: 1.2}}")
        return values
    raise ConfigError(f"motion_scale must be a number, a list of one number per frame or a {{frame: scale}} dict, "
                      f"got {type(motion_scale).__name__}")
