"""Noise schedules and samplers: schedules are data, each sampler is one small update rule over a denoiser.

Every sampler reproduces the matching diffusers scheduler step by step (DDIMScheduler, EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler as dpmsolver++ order 2, LCMScheduler), including their
timestep spacings and float32 schedules; tests/test_sampling.py holds them side by side.

The update rules work k-diffusion style in sigma space, ``x = x_vp * sqrt(1 + sigma^2)``, where sigma^2 is the
noise-to-signal ratio ``(1 - alphas_cumprod) / alphas_cumprod``. There DDIM is an Euler step, its eta noise an
ancestral step, and DPM++ 2M its exponential-integrator form. Between steps the state is kept in the variance
preserving scale the denoiser sees, so a sampler whose target level differs from the next step's level (diffusers'
DDIM steps to ``t - num_train_timesteps // steps`` whatever the spacing) behaves exactly as diffusers does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from .errors import ConfigError

SAMPLERS: tuple[str, ...] = ("ddim", "euler", "euler_a", "dpmpp_2m", "lcm")
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear")
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
KARRAS_SAMPLERS: tuple[str, ...] = ("euler", "euler_a", "dpmpp_2m")

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""``eps(x_vp, t)``: the model's noise (or v) prediction for a VP-scaled latent at train timestep ``t`` (0-d float)."""
Rule = Callable[[int, Tensor, Tensor, float, float], Tensor]
"""``rule(i, x, denoised, sigma, sigma_next)``: one update in sigma space, from level ``sigma`` to ``sigma_next``."""


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: Tensor  # (num_train_timesteps,), float32 as diffusers computes it

    @classmethod
    def from_betas(
        cls,
        schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
    ) -> "NoiseSchedule":
        if schedule not in BETA_SCHEDULES:
            raise ConfigError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
        if not 0 < beta_start <= beta_end < 1:
            raise ConfigError(f"betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start} .. {beta_end}")
        if num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        n = num_train_timesteps
        if schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        else:  # "scaled_linear": linear in sqrt(beta), the latent-diffusion schedule
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def sigmas(self) -> Tensor:
        a = self.alphas_cumprod
        return ((1 - a) / a) ** 0.5


@dataclass(frozen=True)
class SamplerConfig:
    sampler: str = "ddim"  # one of SAMPLERS
    beta_schedule: str = "linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    timestep_spacing: str = "leading"  # ignored by "lcm", which spaces its own steps
    steps_offset: int = 1  # added to "leading" timesteps
    karras: bool = False  # Karras et al. sigmas (euler, euler_a, dpmpp_2m)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like
    prediction_type: str = "epsilon"
    original_inference_steps: int = 50  # LCM's distillation grid
    num_train_timesteps: int = 1000

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)


@dataclass(frozen=True)
class SamplingPlan:
    timesteps: Tensor  # (steps,) float64: the train timestep the denoiser is told at each step
    sigmas: Tensor  # (steps,) float64: noise level of the state entering each step
    sigmas_next: Tensor  # (steps,) float64: level each step moves to (0 after the last)
    init_sigma: float  # the initial state is unit noise times this, in sigma space


def _linspace(stop: float, num: int) -> Tensor:
    """numpy.linspace(0, stop, num) with numpy's arithmetic (i * step, exact end point), so rounding agrees."""
    values = torch.arange(num, dtype=torch.float64) * (stop / max(num - 1, 1))
    if num > 1:
        values[-1] = stop
    return values


def _arange_down(start: float, step: float) -> Tensor:
    """numpy.arange(start, 0, -step) with numpy's arithmetic (start + i * delta, delta = (start - step) - start)."""
    count = math.ceil(start / step)
    return start + torch.arange(count, dtype=torch.float64) * ((start - step) - start)


def spaced_timesteps(spacing: str, count: int, num_train_timesteps: int, steps_offset: int = 0) -> Tensor:
    """``count`` descending train timesteps (float64; "linspace" ones are fractional) as diffusers spaces them."""
    n = num_train_timesteps
    if spacing == "leading":
        return torch.arange(count - 1, -1, -1, dtype=torch.float64) * (n // count) + steps_offset
    if spacing == "trailing":
        return _arange_down(n, n / count).round() - 1
    return _linspace(n - 1, count).flip(0)


def _interp(timesteps: Tensor, table: Tensor) -> Tensor:
    """numpy.interp(timesteps, arange(len(table)), table) for timesteps inside the table."""
    low = timesteps.floor().long().clamp(0, table.numel() - 1)
    high = (low + 1).clamp(max=table.numel() - 1)
    return (table[high] - table[low]) * (timesteps - low) + table[low]


def _sigma_to_t(sigmas: Tensor, log_train_sigmas: Tensor) -> Tensor:
    """Fractional train timesteps of sigma levels, interpolating linearly in log sigma (diffusers' _sigma_to_t)."""
    log_sigma = sigmas.clamp(min=1e-10).log()
    low = (torch.searchsorted(log_train_sigmas, log_sigma, right=True) - 1).clamp(0, log_train_sigmas.numel() - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + _linspace(1.0, steps) * (lo - hi)) ** rho


def _f32(values: Tensor) -> Tensor:
    """Round to float32 and back: diffusers stores these schedules in float32."""
    return values.float().double()


def sampling_plan(config: SamplerConfig, steps: int) -> SamplingPlan:
    """The timesteps and sigma levels ``config`` samples ``steps`` steps at (equal to diffusers' ``timesteps``)."""
    schedule = config.schedule()
    n = schedule.num_train_timesteps
    ac = schedule.alphas_cumprod.double()
    exact_sigmas = ((1 - ac) / ac).sqrt()  # DDIM and LCM index alphas_cumprod directly
    train_sigmas = schedule.sigmas.double()  # Euler and DPM interpolate float32 sigmas
    zero = torch.zeros(1, dtype=torch.float64)
    spacing, offset = config.timestep_spacing, config.steps_offset

    def spaced(count: int) -> Tensor:
        ts = spaced_timesteps(spacing, count, n, offset)
        if ts.min() < 0 or ts.max() > n - 1:
            raise ConfigError(f"{steps} steps with timestep_spacing={spacing!r} and steps_offset={offset} reach "
                              f"timestep {ts.max().item():g}, past {n - 1}; use fewer steps or a smaller steps_offset")
        return ts

    if config.sampler == "ddim":
        ts = spaced(steps).round()
        prev = ts - n // steps
        sigmas = exact_sigmas[ts.long()]
        sigmas_next = torch.where(prev >= 0, exact_sigmas[prev.clamp(min=0).long()], zero)
        return SamplingPlan(ts, sigmas, sigmas_next, math.sqrt(1 + sigmas[0].item() ** 2))

    if config.sampler == "lcm":
        k = n // config.original_inference_steps
        grid = torch.arange(config.original_inference_steps, 0, -1, dtype=torch.float64) * k - 1
        ts = grid[(torch.arange(steps, dtype=torch.float64) * (config.original_inference_steps / steps)).floor().long()]
        sigmas = exact_sigmas[ts.long()]
        return SamplingPlan(ts, sigmas, torch.cat([sigmas[1:], zero]), math.sqrt(1 + sigmas[0].item() ** 2))

    if config.sampler == "dpmpp_2m":
        # DPM-Solver spaces steps + 1 points and drops the last (t = 0) for leading and linspace
        ts = spaced(steps) if spacing == "trailing" else spaced(steps + 1).round()[:-1]
        if config.karras:
            sigmas = _karras(train_sigmas[0].item(), train_sigmas[-1].item(), steps)
            ts = _sigma_to_t(sigmas, _f32(train_sigmas.log())).round()
        else:
            sigmas = _interp(ts, train_sigmas)
        sigmas = _f32(sigmas)
        return SamplingPlan(ts, sigmas, torch.cat([sigmas[1:], zero]), math.sqrt(1 + sigmas[0].item() ** 2))

    # euler, euler_a: diffusers' EulerDiscreteScheduler (fractional float32 timesteps for "linspace")
    ts = _f32(spaced(steps))
    sigmas = _interp(ts, train_sigmas)
    if config.karras:
        sigmas = _karras(sigmas[-1].item(), sigmas[0].item(), steps)
        ts = _f32(_sigma_to_t(sigmas, _f32(train_sigmas.log())))
    sigmas = _f32(sigmas)
    sigma_max = sigmas[0].item()
    # diffusers' init_noise_sigma: unit VP noise for "leading", sigma_max in sigma space otherwise
    init = math.sqrt(sigma_max**2 + 1) if spacing == "leading" else sigma_max
    return SamplingPlan(ts, sigmas, torch.cat([sigmas[1:], zero]), init)


def _choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def validate(config: SamplerConfig, steps: int) -> SamplingPlan:
    """Raise ConfigError, naming the fix, if ``config`` cannot sample ``steps`` steps; else return the plan."""
    _choice("sampler", config.sampler, SAMPLERS)
    _choice("beta_schedule", config.beta_schedule, BETA_SCHEDULES)
    _choice("timestep_spacing", config.timestep_spacing, TIMESTEP_SPACINGS)
    _choice("prediction_type", config.prediction_type, PREDICTION_TYPES)
    n = config.num_train_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= n:
        raise ConfigError(f"steps must be an integer from 1 to num_train_timesteps ({n}), got {steps!r}")
    if config.karras and config.sampler not in KARRAS_SAMPLERS:
        raise ConfigError(f"karras sigmas apply to {', '.join(KARRAS_SAMPLERS)}, not {config.sampler!r}; "
                          "set karras=False or pick one of those samplers")
    if config.eta < 0 or (config.eta != 0 and config.sampler != "ddim"):
        raise ConfigError(f"eta must be >= 0 and only applies to sampler 'ddim' (got eta={config.eta} with "
                          f"{config.sampler!r}); use eta=0, or 'euler_a' for ancestral noise")
    if config.steps_offset < 0:
        raise ConfigError(f"steps_offset must be >= 0, got {config.steps_offset}")
    if config.sampler == "lcm" and not steps <= config.original_inference_steps <= n:
        raise ConfigError(f"LCM needs steps <= original_inference_steps <= num_train_timesteps ({n}), got steps="
                          f"{steps}, original_inference_steps={config.original_inference_steps}; use fewer steps")
    plan = sampling_plan(config, steps)  # raises if the spacing leaves the timestep range
    if not bool((plan.sigmas > plan.sigmas_next).all()):
        raise ConfigError(f"{steps} steps with timestep_spacing={config.timestep_spacing!r} repeat a noise level "
                          f"(too many steps for this spacing); use fewer steps")
    return plan


def seeded_randn_like(like: Tensor, generator: torch.Generator | None) -> Tensor:
    # a CPU generator draws on the CPU and the draw moves to the latent's device, as diffusers' randn_tensor does,
    # so a seed gives the same video on every device
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _euler(config: SamplerConfig, plan: SamplingPlan, noise: Callable[[], Tensor]) -> Rule:
    return lambda i, x, denoised, sigma, sigma_next: x + (x - denoised) / sigma * (sigma_next - sigma)


def _ancestral(
    config: SamplerConfig, plan: SamplingPlan, noise: Callable[[], Tensor], eta: float | None = None
) -> Rule:
    """Euler down to sigma_down, then fresh noise up to sigma_next: Euler ancestral at eta 1, DDIM at config.eta."""
    eta = config.eta if eta is None else eta

    def rule(i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
        up = min(sigma_next, eta * sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma)
        down = math.sqrt(sigma_next**2 - up**2)
        x = x + (x - denoised) / sigma * (down - sigma)
        return x + noise() * up if up > 0 else x

    return rule


def _dpmpp_2m(config: SamplerConfig, plan: SamplingPlan, noise: Callable[[], Tensor]) -> Rule:
    previous: list[Tensor] = []  # the last step's denoised estimate

    def rule(i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
        if sigma_next == 0:  # the final step is first order, and lands on the denoised estimate
            return denoised
        h = math.log(sigma / sigma_next)  # step in log-SNR
        d = denoised
        if previous:  # second order from the previous estimate (midpoint form)
            r = math.log(plan.sigmas[i - 1].item() / sigma) / h
            d = denoised + (denoised - previous[0]) / (2 * r)
        previous[:] = [denoised]
        return (sigma_next / sigma) * x - math.expm1(-h) * d

    return rule


def _lcm(config: SamplerConfig, plan: SamplingPlan, noise: Callable[[], Tensor]) -> Rule:
    sigma_data, timestep_scaling = 0.5, 10.0

    def rule(i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
        # consistency-model boundary condition: c_skip -> 1 and c_out -> 0 as t -> 0
        t = plan.timesteps[i].item() * timestep_scaling
        c_skip = sigma_data**2 / (t**2 + sigma_data**2)
        c_out = t / math.sqrt(t**2 + sigma_data**2)
        denoised = c_out * denoised + c_skip * (x / math.sqrt(1 + sigma**2))
        return denoised + noise() * sigma_next if sigma_next > 0 else denoised

    return rule


_RULES: dict[str, Callable[..., Rule]] = {
    "ddim": _ancestral,
    "euler": _euler,
    "euler_a": partial(_ancestral, eta=1.0),
    "dpmpp_2m": _dpmpp_2m,
    "lcm": _lcm,
}


def start_step(steps: int, strength: float) -> int:
    """Index of the first step that runs when sampling starts from given latents with ``strength`` in (0, 1]:
    ``int(steps * strength)`` steps run, as in diffusers' img2img / video-to-video pipelines."""
    return steps - min(int(steps * strength), steps)


def noised(plan: SamplingPlan, x0: Tensor, noise: Tensor, start: int) -> Tensor:
    """``x0`` noised to the level of step ``start``, VP-scaled: what every diffusers scheduler's ``add_noise`` gives
    (``sqrt(alpha) x0 + sqrt(1 - alpha) noise``; the sigma-space schedulers then hold it times sqrt(1 + sigma^2))."""
    sigma = plan.sigmas[start].item()
    return (x0 + sigma * noise) / math.sqrt(1 + sigma**2)


def diffusers_state_scale(config: SamplerConfig, sigma: float) -> float:
    """Factor from our VP-scaled state to the latents a diffusers scheduler holds at level ``sigma``: the Euler
    schedulers keep theirs in sigma space, the others VP-scaled."""
    return math.sqrt(1 + sigma**2) if config.sampler in ("euler", "euler_a") else 1.0


StepCallback = Callable[[int, Tensor], "Tensor | None"]
"""``callback(i, x)`` after step ``i`` with the VP-scaled state; it may return a replacement state."""


def sample(
    config: SamplerConfig,
    eps: EpsFn,
    noise: Tensor,
    steps: int,
    *,
    init: Tensor | None = None,
    start: int = 0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    trace: list[Tensor] | None = None,
) -> Tensor:
    """Denoise unit Gaussian ``noise`` in ``steps`` steps and return the x_0 estimate (in noise.dtype).

    With ``init`` (clean latents, e.g. encoded video frames) sampling starts at step ``start`` from ``init`` noised to
    that step's level with ``noise``; without it, from pure noise at step 0.
    ``eps(x_vp, t)`` is called once per step with the VP-scaled latent and a 0-d float32 timestep. The state is kept
    in float32 (float64 if the noise is). Extra noise (DDIM eta > 0, euler_a, lcm) is drawn with ``generator`` in
    noise.dtype. ``callback(i, x)`` runs after each step (see StepCallback); ``trace``, if given, receives the VP-scaled
    state after each step (diffusers' ``prev_sample``; Euler's divided by sqrt(1 + sigma_next^2)).
    """
    plan = validate(config, steps)
    if not 0 <= start < steps:
        raise ConfigError(f"the first sampling step must be in [0, {steps}), got {start}")
    if init is None and start:
        raise ConfigError("starting mid-schedule needs the clean latents to noise (init=)")
    work = torch.promote_types(noise.dtype, torch.float32)
    rule = _RULES[config.sampler](config, plan, lambda: seeded_randn_like(noise, generator).to(work))
    timesteps = plan.timesteps.to(device=noise.device, dtype=torch.float32)
    if init is None:
        x = noise.to(work) * (plan.init_sigma / math.sqrt(1 + plan.sigmas[0].item() ** 2))
    else:
        x = noised(plan, init.to(work), noise.to(work), start)
    for i in range(start, steps):
        sigma, sigma_next = plan.sigmas[i].item(), plan.sigmas_next[i].item()
        scale = math.sqrt(1 + sigma**2)
        out = eps(x, timesteps[i]).to(work)
        if config.prediction_type == "epsilon":
            denoised = x * scale - sigma * out
        else:  # v = alpha * eps - sigma_vp * x0
            denoised = (x - sigma * out) / scale
        x = rule(i, x * scale, denoised, sigma, sigma_next) / math.sqrt(1 + sigma_next**2)
        if trace is not None:
            trace.append(x)
        if callback is not None:
            replaced = callback(i, x)
            if replaced is not None:
                x = replaced.to(work)
    return x.to(noise.dtype)
