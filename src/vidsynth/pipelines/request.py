"""One pipeline call as data: the arguments parsed into a frozen request and checked before any compute."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .. import sampling
from ..errors import ConfigError
from .free_init import FreeInit
from .free_noise import FreeNoise
from .long_video import check_long_video

FALLBACK_SAMPLING = {"sampler": "ddim", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                     "timestep_spacing": "leading", "steps_offset": 1, "steps": 25, "cfg_scale": 7.5}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SIDE = 8192  # pixels; far beyond what the models were trained for, and what fits in memory


@dataclass(frozen=True)
class VideoRequest:
    prompt: str | dict[int, str]  # a dict: prompt travel (keyframes)
    negative_prompt: str | dict[int, str]
    cfg_scale: float
    height: int
    width: int
    num_frames: int
    steps: int
    sampler: sampling.SamplerConfig
    clip_skip: int = 1
    latents: torch.Tensor | None = None
    generator: torch.Generator | None = None
    output_type: str = "pil"
    context_length: int = 16             # resolved against the motion module's native length
    context_overlap: int = 4
    closed_loop: bool = False
    motion_scale: float | torch.Tensor = 1.0  # a tensor: one scale per frame (a schedule)
    free_noise: FreeNoise | None = None
    free_init: FreeInit | None = None
    prompt_interpolation: Callable | None = None  # prompt travel's (start, end, a, b) -> frames; None: linear
    input_frames: torch.Tensor | None = None  # (f, 3, H, W) in [-1, 1]: video-to-video / image-to-video
    denoising_strength: float = 1.0
    vae_batch_size: int | None = None
    tiled: bool | None = None
    progress_bar: bool = True
    callback_on_step_end: Callable | None = None
    conditioning_options: dict[str, Any] = field(default_factory=dict)  # family-specific (SDXL size / crop ids)
    image_prompt: Any = None  # pipelines.ip_adapter.ImagePrompt: IP-Adapter images and scale
    keyframes: Any = None     # pipelines.sparsectrl.Keyframes: SparseCtrl keyframes, indices and scale
    control: Any = None       # pipelines.controlnet.ControlRequest: ControlNet frames, scales, guidance spans

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, 4, self.num_frames, self.height // 8, self.width // 8)

    @property
    def start_step(self) -> int:
        """The first sampling step: 0 from noise, later when sampling starts from given frames."""
        if self.input_frames is None or self.denoising_strength >= 1.0:
            return 0  # strength 1 with frames given starts from pure noise, as DiffSynth does
        return sampling.start_step(self.steps, self.denoising_strength)


def sampler_config(defaults: dict, sampler: str | None, options: dict) -> sampling.SamplerConfig:
    """The module's sampling defaults with the sampler and any SamplerConfig fields the caller set (popped from
    ``options``)."""
    fields = set(sampling.SamplerConfig.__dataclass_fields__)
    config = sampling.SamplerConfig(**{k: v for k, v in defaults.items() if k in fields})
    chosen = {k: options.pop(k) for k in list(options) if k in fields}
    if sampler is not None:
        chosen["sampler"] = sampler
    return replace(config, **chosen)


def check(request: VideoRequest, motion_modules, allow_static: bool) -> None:
    """Refuse a request that cannot work, before any compute. ``context_length`` must already be resolved."""
    r = request
    for name in ("height", "width", "num_frames", "clip_skip", "context_overlap"):
        if isinstance(getattr(r, name), bool) or not isinstance(getattr(r, name), int):
            raise ConfigError(f"{name} must be an integer, got {getattr(r, name)!r}")
    if r.height % 8 or r.width % 8 or r.height < 8 or r.width < 8:
        raise ConfigError(f"height and width must be positive multiples of 8, got {r.height}x{r.width}; "
                          f"try {max(8, r.height // 8 * 8)}x{max(8, r.width // 8 * 8)}")
    if max(r.height, r.width) > MAX_SIDE:
        raise ConfigError(f"height and width must be at most {MAX_SIDE} pixels, got {r.height}x{r.width}; render "
                          "smaller and upscale")
    if r.num_frames < 1:
        raise ConfigError(f"num_frames must be at least 1, got {r.num_frames}")
    check_long_video(r)
    if not isinstance(r.cfg_scale, (int, float)) or not math.isfinite(r.cfg_scale) or r.cfg_scale < 0:
        raise ConfigError(f"cfg_scale must be a finite number >= 0 (1 disables classifier-free guidance), "
                          f"got {r.cfg_scale!r}")
    if r.clip_skip < 1:
        raise ConfigError(f"clip_skip counts layers from the end and starts at 1 (the last layer), got {r.clip_skip}")
    if r.output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {r.output_type!r}")
    sampling.validate(r.sampler, r.steps)
    if motion_modules is None:
        if not allow_static and r.num_frames > 1:
            raise ConfigError("no motion module is loaded, so frames would not move together; load an AnimateDiff "
                              "motion module into the ModelManager, or pass allow_static=True for independent frames")
        native = max(16, r.context_length)
    else:
        native = motion_modules.config.pe_length
    if r.free_noise is not None:  # the motion modules window inside; the UNet may see the whole video
        native = max(native, r.num_frames)
    if not 1 <= r.context_length <= native:
        raise ConfigError(f"context_length must be between 1 and the motion module's native length {native}, "
                          f"got {r.context_length}")
    if r.num_frames > r.context_length and not 0 <= r.context_overlap < r.context_length:
        raise ConfigError(f"context_overlap must be in [0, context_length={r.context_length}), got "
                          f"{r.context_overlap}")
    if r.latents is not None:
        if not isinstance(r.latents, torch.Tensor) or tuple(r.latents.shape) != r.latent_shape:
            raise ConfigError(f"latents must have shape (1, 4, num_frames, height/8, width/8) = "
                              f"{r.latent_shape}, got {tuple(getattr(r.latents, 'shape', ())) or type(r.latents)}")
        if not r.latents.is_floating_point():
            raise ConfigError(f"latents must be floating point, got {r.latents.dtype}")
        if r.latents.device.type == "meta" or not torch.isfinite(r.latents).all():
            raise ConfigError(f"latents must hold finite values on a real device (the CPU or the pipeline's), got a "
                              f"{r.latents.device.type} tensor{'' if r.latents.device.type == 'meta' else ' with NaN/inf'}")
    if not (isinstance(r.denoising_strength, (int, float)) and 0 < r.denoising_strength <= 1):
        raise ConfigError(f"denoising_strength (strength) must be in (0, 1]: 1 starts from pure noise, smaller keeps "
                          f"more of input_frames; got {r.denoising_strength!r}")
    if r.denoising_strength < 1 and r.input_frames is None:
        raise ConfigError(f"denoising_strength={r.denoising_strength} needs input_frames (the video or images to "
                          "start from); without them sampling starts from noise")
    if r.input_frames is not None and len(r.input_frames) != r.num_frames:
        raise ConfigError(f"input_frames has {len(r.input_frames)} frames but num_frames={r.num_frames}; pass as "
                          f"many frames as the video has (e.g. [image] * {r.num_frames} to animate one image)")
    if r.input_frames is not None and r.denoising_strength < 1 and r.start_step >= r.steps:
        raise ConfigError(f"denoising_strength={r.denoising_strength} with {r.steps} steps runs no step "
                          f"(int(steps * strength) = 0); raise the strength or the step count")
