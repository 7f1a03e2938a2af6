"""FreeNoise (Qiu et al., "FreeNoise: Tuning-Free Longer Video Diffusion via Noise Rescheduling"): the options and the
noise rescheduling of the initial latents. The window fusion runs inside the motion modules
(models/frame_windows.py); the pipeline sets it on the motion set for the call.

diffusers' names and defaults (``enable_free_noise``): ``context_length=16``, ``context_stride=4``,
``weighting_scheme="pyramid"``, ``noise_type="shuffle_context"``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from ..errors import ConfigError
from ..models.frame_windows import FrameWindows

NOISE_TYPES = ("shuffle_context", "repeat_context", "random")


@dataclass(frozen=True)
class FreeNoise:
    context_length: int = 16
    context_stride: int = 4
    weighting_scheme: str = "pyramid"
    noise_type: str = "shuffle_context"

    def __post_init__(self):
        if self.noise_type not in NOISE_TYPES:
            raise ConfigError(f"free_noise noise_type must be one of {', '.join(NOISE_TYPES)}, "
                              f"got {self.noise_type!r}")
        self.windows()  # checks length, stride and weighting scheme

    @classmethod
    def parse(cls, options: "FreeNoise | dict | bool | None", native_length: int) -> "FreeNoise | None":
        """``free_noise=`` of a call: None/False (off), True (defaults), a dict of the fields, or a FreeNoise.
        ``context_length=None`` means the motion module's native length (as diffusers); longer is refused."""
        if options is None or options is False:
            return None
        if options is True:
            options = {}
        if isinstance(options, dict):
            unknown = set(options) - {f.name for f in fields(cls)}
            if unknown:
                raise ConfigError(f"free_noise: unknown option(s) {', '.join(sorted(unknown))}; the options are "
                                  f"{', '.join(f.name for f in fields(cls))}")
            options = dict(options)
            if options.get("context_length", 16) is None:
                options["context_length"] = native_length
            options = cls(**options)
        if not isinstance(options, cls):
            raise ConfigError(f"free_noise must be a dict of options, True or None, got {type(options).__name__}")
        if options.context_length > native_length:
            raise ConfigError(f"free_noise context_length {options.context_length} exceeds the motion module's native "
                              f"length {native_length}; its positional encoding has no positions beyond it: use "
                              f"context_length <= {native_length}")
        return options

    def windows(self) -> FrameWindows:
        return FrameWindows(self.context_length, self.context_stride, self.weighting_scheme)


def _generators(generator, batch: int) -> list:
    if isinstance(generator, Sequence):
        if len(generator) != batch:
            raise ConfigError(f"a list of {len(generator)} generators for a batch of {batch} videos; pass one per "
                              f"video or a single generator")
        return list(generator)
    return [generator] * batch


def _randn(shape, generators: list, device, dtype) -> torch.Tensor:
    if len(set(map(id, generators))) == 1:  # one generator: one draw over the batch, as diffusers' randn_tensor
        g = generators[0]
        return torch.randn(shape, generator=g, device=g.device if g is not None else "cpu", dtype=dtype).to(device)
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device)
                      for g in generators])


def initial_noise(options: FreeNoise, shape: tuple[int, ...], *, generator=None, latents: torch.Tensor | None = None,
                  device="cpu", dtype=torch.float32) -> torch.Tensor:
    """FreeNoise's initial latents ``(b, 4, num_frames, h, w)``.

    random: plain Gaussian noise. shuffle_context (diffusers' draw order: the full-length noise, then one
    ``randperm`` per stride): frames ``[i, i + stride)`` for i = length, length + stride, ... take the frames
    ``[i - length, i - length + stride)`` in shuffled order, so every window holds a reshuffle of the first window's
    noise. repeat_context: the first ``context_length`` frames tiled over the video. ``latents`` of the full length
    are used as they are; latents of ``context_length`` frames are the base that shuffle / repeat extends.

    Two places where diffusers departs from the paper and we follow the paper: its repeat_context compares
    context_length with the string "repeat_context", so it draws full-length noise and "repeats" nothing (random);
    and a list of generators (one per video) crashes shuffle_context in ``randperm`` (diffusers#13653), where each
    video here shuffles with its own generator.
    """
    b, _, num_frames = shape[:3]
    length, stride = options.context_length, options.context_stride
    generators = _generators(generator, b)
    if latents is not None:
        if latents.shape[2] == num_frames:
            return latents.to(device, dtype)
        if tuple(latents.shape) != (*shape[:2], length, *shape[3:]):
            raise ConfigError(f"latents for FreeNoise have shape {tuple(latents.shape)}: give {tuple(shape)} "
                              f"(used as they are) or {length} frames (the window FreeNoise extends)")
        base = latents.to(device, dtype)
    else:
        drawn = length if options.noise_type == "repeat_context" else num_frames
        base = _randn((*shape[:2], drawn, *shape[3:]), generators, device, dtype)
        if options.noise_type == "random":
            return base
    if options.noise_type == "repeat_context":
        repeats = -(-num_frames // length)
        return torch.cat([base[:, :, :length]] * repeats, dim=2)[:, :, :num_frames]
    if options.noise_type == "random":  # latents of one window, random requested: the rest drawn fresh
        rest = _randn((*shape[:2], num_frames - length, *shape[3:]), generators, device, dtype)
        return torch.cat([base, rest], dim=2)
    noise = torch.cat([base, base.new_zeros((*shape[:2], num_frames - base.shape[2], *shape[3:]))], dim=2)
    shared = len(set(map(id, generators))) == 1
    for i in range(length, num_frames, stride):
        start = i - length
        count = min(stride, num_frames - i)
        perms = [torch.randperm(stride, generator=g) for g in (generators[:1] if shared else generators)]
        for video in range(b):
            order = start + perms[0 if shared else video][:count]
            noise[video, :, i:i + count] = noise[video, :, order]
    return noise
