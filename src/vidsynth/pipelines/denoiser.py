"""The denoiser the sampler calls: UNet + motion modules (+ control residuals) over context windows, with CFG."""
from __future__ import annotations

from typing import Protocol

import torch

from ..models.frame_windows import FrameWindows
from .conditioning import Conditioning
from .context import context_windows, window_weights


class ControlProvider(Protocol):
    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                  frames: list[int], step: int) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Residuals for one window at one step (added by ``UNet.forward(control=...)``), or None to add none."""


def sum_residuals(parts: list[tuple[list[torch.Tensor], torch.Tensor]]):
    if not parts:
        return None
    down, mid = parts[0]
    for more_down, more_mid in parts[1:]:
        down, mid = [a + b for a, b in zip(down, more_down)], mid + more_mid
    return down, mid


class WindowedDenoiser:
    """``eps(video, t)`` for the whole (1, 4, f, h, w) video: every context window runs once per step, conditional
    and unconditional clips in one batch; overlapping windows cross-fade by their blending weights. ``step`` counts
    the calls (the sampler calls once per step) so control providers know where in the schedule they are."""

    def __init__(self, pipe, cond: Conditioning, *, cfg_scale: float, num_frames: int, context_length: int,
                 context_overlap: int, closed_loop: bool, motion_scale: float | torch.Tensor, controls=(),
                 start_step: int = 0, free_noise: FrameWindows | None = None):
        self.unet, self.motion, self.dtype, self.device = pipe.unet, pipe.motion_modules, pipe.dtype, pipe.device
        self.cond, self.cfg_scale, self.num_frames = cond, cfg_scale, num_frames
        self.windows = context_windows(num_frames, context_length, context_overlap, closed_loop)
        # all windows have one length; a lone window weighs every frame 1
        self.weights = window_weights(len(self.windows[0]), context_overlap if len(self.windows) > 1 else 0)
        self.weights = self.weights.to(self.device)
        self.motion_scale, self.controls, self.step = motion_scale, list(controls), start_step
        self.free_noise = free_noise  # FreeNoise's windows inside the motion modules, or None
        self.pool_norms = self.motion is not None and self.motion.config.pool_resnet_norms

    def __call__(self, video: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.motion is not None:  # per-call settings of the motion set
            self.motion.scale, self.motion.free_noise = self.motion_scale, self.free_noise
        x = video[0].transpose(0, 1)  # (f, 4, h, w): frames folded into the batch
        total = torch.zeros_like(x)
        weight_sum = torch.zeros(self.num_frames, device=x.device, dtype=x.dtype)
        for frames in self.windows:
            out = self.window(x[frames], t, frames)
            total[frames] += out * self.weights[:, None, None, None]
            weight_sum[frames] += self.weights
        self.step += 1
        return (total / weight_sum[:, None, None, None]).transpose(0, 1).unsqueeze(0)

    def window(self, xw: torch.Tensor, t: torch.Tensor, frames: list[int]) -> torch.Tensor:
        """The guided noise prediction (len, 4, h, w) of one window."""
        n_cond, length = self.cond.n_cond, len(frames)
        batch = xw.to(self.dtype).repeat(n_cond, 1, 1, 1)  # clip 0 = uncond, clip 1 = cond
        context, y = self.cond.window(frames)
        if self.motion is not None and isinstance(self.motion_scale, torch.Tensor):  # a schedule: this window's part
            self.motion.scale = self.motion_scale[frames]
        timesteps = t.to(self.device, torch.float32).reshape(-1)[:1].expand(batch.shape[0])
        control = sum_residuals([r for c in self.controls
                                 if (r := c.residuals(batch, timesteps, context, y, frames, self.step)) is not None])
        kwargs = {"control": control} if control is not None else {}
        out = self.unet(batch, timesteps, context, y, num_frames=length, motion=self.motion,
                        pool_resnet_norms=self.pool_norms, **kwargs).float()
        if n_cond == 2:
            uncond, text = out.chunk(2)
            out = uncond + self.cfg_scale * (text - uncond)
        return out
