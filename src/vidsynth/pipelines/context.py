"""Sliding context windows over frames, for videos longer than the motion module's native length."""
from __future__ import annotations

import torch


def context_windows(num_frames: int, length: int, overlap: int, closed_loop: bool = False) -> list[list[int]]:
    """Frame indices of each window. Windows advance by ``length - overlap``; without a loop the last one is
    aligned to the end of the video; with ``closed_loop`` they wrap around so the last frames blend into the first."""
    if num_frames <= length:
        return [list(range(num_frames))]
    stride = length - overlap
    if closed_loop:
        count = -(-num_frames // stride)
        return [[(start + i) % num_frames for i in range(length)] for start in range(0, count * stride, stride)]
    starts = list(range(0, num_frames - length, stride)) + [num_frames - length]
    return [list(range(start, start + length)) for start in starts]


def window_weights(length: int, overlap: int, dtype=torch.float32) -> torch.Tensor:
    """Per-frame blending weights of one window: 1 in the middle, a linear ramp across the overlaps at both ends,
    so where two windows overlap their predictions cross-fade."""
    i = torch.arange(length, dtype=torch.float64)
    ramp = torch.minimum(i + 1, length - i) / (overlap + 1)
    return ramp.clamp(max=1.0).to(dtype)
