"""FreeInit (Wu et al., "FreeInit: Bridging Initialization Gap in Video Diffusion Models"): the sampler loop runs
``num_iters`` times; after each run the result is diffused back to the last train timestep with the first run's
noise, and its low spatio-temporal frequencies are kept while the high ones come from fresh Gaussian noise.

diffusers' names and defaults (``enable_free_init``, pipelines/free_init_utils.py): ``num_iters=3``,
``use_fast_sampling=False`` (coarse-to-fine: iteration k of n runs ``int(steps / n * (k + 1))`` steps),
``method="butterworth"``, ``order=4``, ``spatial_stop_frequency=0.25``, ``temporal_stop_frequency=0.25``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from ..errors import ConfigError

METHODS = ("butterworth", "gaussian", "ideal")


@dataclass(frozen=True)
class FreeInit:
    num_iters: int = 3
    use_fast_sampling: bool = False
    method: str = "butterworth"
    order: int = 4
    spatial_stop_frequency: float = 0.25
    temporal_stop_frequency: float = 0.25

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"free_init method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.num_iters, int) or self.num_iters < 1:
            raise ConfigError(f"free_init num_iters must be a whole number >= 1, got {self.num_iters!r}")
        for name in ("spatial_stop_frequency", "temporal_stop_frequency"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"free_init {name} is a normalised frequency in [0, 1], got {getattr(self, name)}")
        if self.order <= 0:
            raise ConfigError(f"free_init order must be positive, got {self.order}")

    @classmethod
    def parse(cls, options: "FreeInit | dict | bool | None") -> "FreeInit | None":
        """``free_init=`` of a call: None/False (off), True (defaults), a dict of the fields, or a FreeInit."""
        if options is None or options is False:
            return None
        if options is True:
            return cls()
        if isinstance(options, dict):
            unknown = set(options) - {f.name for f in fields(cls)}
            if unknown:
                raise ConfigError(f"free_init: unknown option(s) {', '.join(sorted(unknown))}; the options are "
                                  f"{', '.join(f.name for f in fields(cls))}")
            return cls(**options)
        if not isinstance(options, cls):
            raise ConfigError(f"free_init must be a dict of options, True or None, got {type(options).__name__}")
        return options

    def steps(self, steps: int, iteration: int) -> int:
        if not self.use_fast_sampling:
            return steps
        return max(1, int(steps / self.num_iters * (iteration + 1)))


def low_pass_filter(shape: tuple[int, ...], method: str = "butterworth", order: float = 4,
                    spatial_stop_frequency: float = 0.25, temporal_stop_frequency: float = 0.25) -> torch.Tensor:
    """The filter over the last three axes (frames, height, width) of ``shape`` in fftshift order, diffusers'
    ``_get_free_init_freq_filter`` vectorised. d^2 = ((d_s / d_t)(2t/T - 1))^2 + (2h/H - 1)^2 + (2w/W - 1)^2;
    butterworth 1 / (1 + (d^2 / d_s^2)^order), gaussian exp(-d^2 / (2 d_s^2)), ideal 1 where d^2 <= 2 d_s."""
    if method not in METHODS:
        raise ConfigError(f"free_init method must be one of {', '.join(METHODS)}, got {method!r}")
    if spatial_stop_frequency == 0 or temporal_stop_frequency == 0:
        return torch.zeros(shape)
    time, height, width = shape[-3:]

    def axis(n: int) -> torch.Tensor:
        return 2 * torch.arange(n, dtype=torch.float64) / n - 1

    d_square = ((spatial_stop_frequency / temporal_stop_frequency * axis(time))[:, None, None] ** 2
                + axis(height)[None, :, None] ** 2 + axis(width)[None, None, :] ** 2)
    if method == "butterworth":
        mask = 1 / (1 + (d_square / spatial_stop_frequency**2) ** order)
    elif method == "gaussian":
        mask = torch.exp(-1 / (2 * spatial_stop_frequency**2) * d_square)
    else:  # diffusers compares d^2 (not d) with 2 d_s; kept for parity
        mask = (d_square <= spatial_stop_frequency * 2).double()
    return mask.float().expand(shape).clone()


def mix_frequencies(x: torch.Tensor, noise: torch.Tensor, low_pass: torch.Tensor) -> torch.Tensor:
    """Low frequencies of ``x``, high frequencies of ``noise`` (3-D FFT over frames, height, width)."""
    dims = (-3, -2, -1)
    x_freq = torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)
    noise_freq = torch.fft.fftshift(torch.fft.fftn(noise, dim=dims), dim=dims)
    mixed = x_freq * low_pass + noise_freq * (1 - low_pass)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real


SampleLoop = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``loop(noise, steps, iteration) -> x0``: the whole sampler loop from unit-scale noise in ``steps`` steps."""


def free_init_sample(options: FreeInit | None, loop: SampleLoop, noise: torch.Tensor, steps: int, *,
                     alphas_cumprod: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run ``loop`` ``num_iters`` times (once without FreeInit). Between runs the result ``x0`` becomes
    ``mix(sqrt(a) x0 + sqrt(1 - a) noise, z)``, with ``a`` the cumulative alpha of the last train timestep, ``noise``
    the first run's and ``z`` fresh Gaussian noise drawn with ``generator`` (float32, like diffusers)."""
    if options is None:
        return loop(noise, steps, 0)
    low_pass = low_pass_filter((1, *noise.shape[1:]), options.method, options.order,
                               options.spatial_stop_frequency, options.temporal_stop_frequency).to(noise.device)
    a = alphas_cumprod[-1].to(torch.float32)
    x = noise
    for iteration in range(options.num_iters):
        if iteration:
            diffused = (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float())
            fresh = torch.randn(noise.shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else "cpu").to(noise.device)
            x = mix_frequencies(diffused, fresh, low_pass).to(noise.dtype)
        x0 = loop(x, options.steps(steps, iteration), iteration)
    return x0
