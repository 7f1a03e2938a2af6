"""FreeNoise's window-based attention fusion (Qiu et al., "FreeNoise", Eq. 9), used inside the motion modules.

The temporal attentions of a motion module's transformer block see the frames in sliding windows of
``context_length`` frames advancing by ``context_stride`` (positions 0..length-1 in every window); each frame's result
is the weighted mean of the windows that contain it; the feed-forward then runs once over all frames. This is where
diffusers puts FreeNoise (``FreeNoiseTransformerBlock``), not around the whole UNet as our context windows do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError

WEIGHTING_SCHEMES = ("pyramid", "flat", "delayed_reverse_sawtooth")


def window_weights(length: int, scheme: str = "pyramid") -> list[float]:
    """Per-frame weights of one window, diffusers' ``_get_frame_weights``: pyramid [1, 2, .., 2, 1], flat all 1,
    delayed_reverse_sawtooth 0.01 over the first half, then falling from the middle to 1 ([0.01, 2, 2, 1]). For odd
    lengths diffusers' sawtooth has length + 1 entries (and fails); we give its documented [0.01, 0.01, 3, 2, 1]."""
    half = length // 2
    if scheme == "flat":
        return [1.0] * length
    if scheme == "pyramid":
        rising = [float(i) for i in range(1, half + 1)]
        return rising + rising[::-1] if length % 2 == 0 else rising + [half + 1.0] + rising[::-1]
    if scheme == "delayed_reverse_sawtooth":
        mid = (length + 1) // 2
        peak = [float(mid)] if length % 2 == 0 else []
        return [0.01] * (mid - 1) + peak + [float(i) for i in range(mid, 0, -1)]
    raise ConfigError(f"weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got {scheme!r}")


@dataclass(frozen=True)
class FrameWindows:
    """Sliding windows over the frame axis of a ``(batch, frames, channels)`` tensor, fused by weights."""

    context_length: int = 16
    context_stride: int = 4
    weighting_scheme: str = "pyramid"

    def __post_init__(self):
        if self.context_length < 1 or self.context_stride < 1:
            raise ConfigError(f"free_noise context_length and context_stride must be at least 1, got "
                              f"{self.context_length} and {self.context_stride}")
        if self.context_stride > self.context_length:
            raise ConfigError(f"free_noise context_stride {self.context_stride} exceeds context_length "
                              f"{self.context_length}: some frames would be in no window; use a stride <= the length")
        window_weights(1, self.weighting_scheme)  # refuses unknown schemes

    def spans(self, num_frames: int) -> list[tuple[int, int]]:
        """``[start, end)`` of every window: starts 0, stride, ... while a whole window fits, plus one window aligned
        to the end when the last does not reach it (diffusers' windows). A clip no longer than a window is one."""
        if num_frames <= self.context_length:
            return [(0, num_frames)]
        spans = [(s, s + self.context_length) for s in range(0, num_frames - self.context_length + 1,
                                                              self.context_stride)]
        if spans[-1][1] != num_frames:
            spans.append((num_frames - self.context_length, num_frames))
        return spans

    def fuse(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` on every window of ``x`` (batch, frames, channels); each frame's weighted mean over its windows.

        The end-aligned last window is fused over all its frames with its own weights, as the paper's fusion (every
        window containing a frame contributes). diffusers instead adds only the frames no earlier window reached,
        and counts them with one window weight (``weights[:, -n]``, a scalar) while weighting their values per frame,
        so those tail frames come out scaled by w[i] / w[-n] rather than 1; we do not reproduce that."""
        num_frames = x.shape[1]
        spans = self.spans(num_frames)
        if len(spans) == 1:
            return fn(x)
        weights = torch.tensor(window_weights(self.context_length, self.weighting_scheme), device=x.device,
                               dtype=torch.float32)
        total = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        weight_sum = torch.zeros(num_frames, device=x.device, dtype=torch.float32)
        for start, end in spans:
            total[:, start:end] += fn(x[:, start:end]).float() * weights[:, None]
            weight_sum[start:end] += weights
        return (total / weight_sum[:, None]).to(x.dtype)
