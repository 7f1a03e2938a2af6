"""Samplers against diffusers' schedulers, step by step, with a deterministic toy denoiser.

Tolerances: both sides run in float32; our update rules work in sigma space with float64 coefficients while diffusers
mixes float32 coefficients in VP or sigma space, so the states agree to float32 rounding accumulated over the steps.
Measured max abs error over every intermediate VP-scaled latent (|x| up to ~4): <= 2.3e-5 (DPM++ 2M Karras, 20 steps),
<= 1.3e-5 elsewhere, and a float64 run of ours is as close to both; we assert 5e-5. Timesteps are equal exactly
(Euler-Karras fractional ones to 1e-6 relative); float32 sigmas agree to 1e-6 relative.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # diffusers + numpy 2 warn about __array__
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

from vidsynth.errors import ConfigError  # noqa: E402
from vidsynth.sampling import (  # noqa: E402
    SAMPLERS,
    SamplerConfig,
    NoiseSchedule,
    sample,
    sampling_plan,
    start_step,
    validate,
)



SHAPE = (1, 4, 3, 6, 6)  # (batch, channels, frames, height, width): a tiny video latent
ATOL = 5e-5


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.5 * torch.tanh(x) + 0.2 * x * (t / 1000) + 0.05 * torch.cos(t / 100)


def diffusers_scheduler(cfg: SamplerConfig):
    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                  beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type)
    spacing = dict(timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset)
    if cfg.sampler == "ddim":
        return diffusers.DDIMScheduler(**common, **spacing, clip_sample=False, set_alpha_to_one=True)
    if cfg.sampler == "euler":
        return diffusers.EulerDiscreteScheduler(**common, **spacing, use_karras_sigmas=cfg.karras)
    if cfg.sampler == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**common, **spacing)
    if cfg.sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**common, **spacing, algorithm_type="dpmsolver++",
                                                     solver_order=2, use_karras_sigmas=cfg.karras)
    return diffusers.LCMScheduler(**common, original_inference_steps=cfg.original_inference_steps)


def diffusers_run(cfg: SamplerConfig, noise: torch.Tensor, steps: int, seed: int):
    """diffusers' denoising loop by hand; returns its timesteps and every prev_sample, VP-scaled."""
    scheduler = diffusers_scheduler(cfg)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    x, states = noise * scheduler.init_noise_sigma, []
    for i, t in enumerate(scheduler.timesteps):
        out = toy_eps(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator, **kwargs).prev_sample
        if cfg.sampler in ("euler", "euler_a"):  # Euler schedulers keep the sigma-space latent
            states.append(x / (scheduler.sigmas[i + 1] ** 2 + 1) ** 0.5)
        else:
            states.append(x)
    return scheduler.timesteps, states


def assert_same_timesteps(ours: torch.Tensor, theirs: torch.Tensor, cfg: SamplerConfig) -> None:
    if cfg.sampler in ("euler", "euler_a") and cfg.karras:
        # fractional timesteps interpolated in float32 log sigma: numpy's float32 log and torch's differ by an ulp
        torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=0)
    else:
        assert ours.tolist() == theirs.double().tolist()


CASES = [
    (SamplerConfig(), 10),  # AnimateDiff v1/v2/v3
    (SamplerConfig(), 7),  # 1000 % 7 != 0
    (SamplerConfig(timestep_spacing="trailing"), 6),
    (SamplerConfig(timestep_spacing="linspace", beta_schedule="scaled_linear"), 9),  # DDIM's prev != next timestep
    (SamplerConfig(eta=0.7), 8),
    (SamplerConfig(eta=1.0, timestep_spacing="trailing"), 5),
    (SamplerConfig(prediction_type="v_prediction"), 6),
    (SamplerConfig(sampler="euler", beta_schedule="scaled_linear", beta_end=0.020), 8),  # SDXL beta module
    (SamplerConfig(sampler="euler", timestep_spacing="trailing"), 4),  # AnimateDiff-Lightning
    (SamplerConfig(sampler="euler", timestep_spacing="linspace"), 9),  # fractional timesteps
    (SamplerConfig(sampler="euler", karras=True, beta_schedule="scaled_linear"), 12),
    (SamplerConfig(sampler="euler", timestep_spacing="trailing", prediction_type="v_prediction"), 5),
    (SamplerConfig(sampler="euler_a"), 8),
    (SamplerConfig(sampler="euler_a", timestep_spacing="trailing", beta_schedule="scaled_linear"), 5),
    (SamplerConfig(sampler="dpmpp_2m"), 10),
    (SamplerConfig(sampler="dpmpp_2m", karras=True, beta_schedule="scaled_linear"), 12),
    (SamplerConfig(sampler="dpmpp_2m", karras=True, timestep_spacing="trailing"), 20),  # >= 15 steps: another branch
    (SamplerConfig(sampler="dpmpp_2m", timestep_spacing="linspace"), 7),
    (SamplerConfig(sampler="dpmpp_2m", timestep_spacing="trailing", prediction_type="v_prediction"), 6),
    (SamplerConfig(sampler="lcm"), 4),  # AnimateLCM (diffusers model card)
    (SamplerConfig(sampler="lcm", original_inference_steps=100), 6),  # AnimateLCM's own inference config
    (SamplerConfig(sampler="lcm", beta_schedule="scaled_linear"), 7),
    (SamplerConfig(sampler="lcm", prediction_type="v_prediction"), 3),
]


def case_id(v: SamplerConfig | int) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v.sampler}-{v.timestep_spacing}-{v.beta_schedule}-k{int(v.karras)}-eta{v.eta}-{v.prediction_type}"


@pytest.mark.parametrize("cfg,steps", CASES, ids=case_id)
def test_matches_diffusers_step_by_step(cfg: SamplerConfig, steps: int):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    expected_ts, expected = diffusers_run(cfg, noise, steps, seed=7)

    seen_ts: list[float] = []
    trace: list[torch.Tensor] = []
    progress: list[tuple[int, int]] = []

    def eps(x, t):
        assert t.dim() == 0 and t.dtype == torch.float32
        seen_ts.append(t.item())
        return toy_eps(x, t)

    result = sample(cfg, eps, noise, steps, generator=torch.Generator().manual_seed(7),
                    callback=lambda i, x: progress.append((i, steps)), trace=trace)

    assert_same_timesteps(torch.tensor(seen_ts, dtype=torch.float64), expected_ts, cfg)
    assert progress == [(i, steps) for i in range(steps)]
    assert len(trace) == len(expected) == steps
    for i, (ours, theirs) in enumerate(zip(trace, expected)):
        err = (ours - theirs).abs().max().item()
        assert err <= ATOL, f"step {i}: max abs error {err:.2e}"
    assert torch.equal(result, trace[-1])
    assert result.abs().max() > 0.05  # a real result, not a collapsed one


START_CASES = [
    (SamplerConfig(), 10, 0.6),
    (SamplerConfig(eta=0.7), 8, 0.5),
    (SamplerConfig(sampler="euler", beta_schedule="scaled_linear", beta_end=0.020), 8, 0.75),
    (SamplerConfig(sampler="euler", timestep_spacing="trailing"), 6, 0.5),
    (SamplerConfig(sampler="euler_a"), 8, 0.4),
    (SamplerConfig(sampler="dpmpp_2m"), 10, 0.7),
    (SamplerConfig(sampler="dpmpp_2m", karras=True, beta_schedule="scaled_linear"), 12, 0.5),
    (SamplerConfig(sampler="lcm", original_inference_steps=100), 6, 0.5),
]


@pytest.mark.parametrize("cfg,steps,strength", START_CASES, ids=lambda v: case_id(v) if not isinstance(v, float)
                         else f"strength{v}")
def test_start_mid_schedule_matches_diffusers(cfg: SamplerConfig, steps: int, strength: float):
    """Video-to-video: diffusers' get_timesteps (``int(steps * strength)`` steps run), ``add_noise`` at the first of
    them, ``set_begin_index``, then the same loop. Same tolerance as the full runs."""
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    scheduler = diffusers_scheduler(cfg)
    scheduler.set_timesteps(steps)
    begin = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[begin * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin * scheduler.order)
    x = scheduler.add_noise(init, noise, timesteps[:1])
    generator, expected = torch.Generator().manual_seed(7), []
    kwargs = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    for t in timesteps:
        x = scheduler.step(toy_eps(scheduler.scale_model_input(x, t), t), t, x, generator=generator, **kwargs).prev_sample
        sigma = scheduler.sigmas[scheduler.step_index] if cfg.sampler in ("euler", "euler_a") else 0.0
        expected.append(x / (sigma**2 + 1) ** 0.5)

    start = start_step(steps, strength)
    assert start == begin and 0 < start < steps
    seen, trace = [], []
    result = sample(cfg, lambda x, t: seen.append(t.item()) or toy_eps(x, t), noise, steps, init=init, start=start,
                    generator=torch.Generator().manual_seed(7), trace=trace)
    assert_same_timesteps(torch.tensor(seen, dtype=torch.float64), timesteps, cfg)
    assert len(trace) == len(expected) == steps - start
    for i, (ours, theirs) in enumerate(zip(trace, expected)):
        err = (ours - theirs).abs().max().item()
        assert err <= ATOL, f"step {start + i}: max abs error {err:.2e}"
    assert (result - init).abs().max() > 0.05  # the start state was noised: the result is not the input


def test_start_needs_init_and_a_step_in_range():
    with pytest.raises(ConfigError, match="init="):
        sample(SamplerConfig(), toy_eps, torch.zeros(SHAPE), 4, start=2)
    with pytest.raises(ConfigError, match="first sampling step"):
        sample(SamplerConfig(), toy_eps, torch.zeros(SHAPE), 4, init=torch.zeros(SHAPE), start=4)


FAMILIES = {
    "ddim": SamplerConfig(),
    "euler": SamplerConfig(sampler="euler"),
    "euler_karras": SamplerConfig(sampler="euler", karras=True),
    "dpmpp_2m": SamplerConfig(sampler="dpmpp_2m"),
    "dpmpp_2m_karras": SamplerConfig(sampler="dpmpp_2m", karras=True),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_and_sigmas_equal_diffusers(family: str, spacing: str):
    cfg = SamplerConfig(**{**FAMILIES[family].__dict__, "timestep_spacing": spacing})
    # DPM-Solver's "leading" spaces steps + 1 points, so 999 steps with steps_offset 1 would reach t = 1000
    most = 500 if family.startswith("dpmpp") and spacing == "leading" else 999
    for steps in [*range(1, 61), 77, 100, 128, 250, 333, 500, most]:
        validate(cfg, steps)
        plan = sampling_plan(cfg, steps)
        scheduler = diffusers_scheduler(cfg)
        scheduler.set_timesteps(steps)
        assert_same_timesteps(plan.timesteps, scheduler.timesteps, cfg)
        if cfg.sampler != "ddim":
            torch.testing.assert_close(plan.sigmas.float(), scheduler.sigmas[:-1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("original_steps", [50, 100])  # diffusers' default, AnimateLCM's own config
def test_lcm_timesteps_equal_diffusers(original_steps: int):
    cfg = SamplerConfig(sampler="lcm", original_inference_steps=original_steps)
    for steps in range(1, original_steps + 1):
        scheduler = diffusers_scheduler(cfg)
        scheduler.set_timesteps(steps)
        assert sampling_plan(cfg, steps).timesteps.tolist() == scheduler.timesteps.double().tolist(), steps


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_point_mass_data_is_recovered(sampler: str):
    """If every training image were the constant c, the exact noise predictor leads every sampler to c."""
    cfg = SamplerConfig(sampler=sampler)
    ac = cfg.schedule().alphas_cumprod.double()
    c = 0.3

    def oracle(x, t):
        a = ac[int(t.item())]  # integer timesteps: leading spacing, no Karras
        return ((x.double() - a.sqrt() * c) / (1 - a).sqrt()).float()

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    result = sample(cfg, oracle, noise, 6, generator=torch.Generator().manual_seed(4))
    # LCM's boundary condition keeps c_skip(t=19) * x_t ~ 7e-6 of the last noisy input
    assert (result - c).abs().max().item() < (1e-4 if sampler == "lcm" else 1e-5)


def test_generator_makes_runs_reproducible():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    cfg = SamplerConfig(sampler="euler_a")
    run = lambda seed: sample(cfg, toy_eps, noise, 5, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_float64_noise_samples_in_float64():
    noise = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = sample(SamplerConfig(sampler="dpmpp_2m"), lambda x, t: toy_eps(x, t).to(x.dtype), noise, 5)
    assert result.dtype == torch.float64
    result32 = sample(SamplerConfig(sampler="dpmpp_2m"), toy_eps, noise.float(), 5)
    assert (result.float() - result32).abs().max() < 1e-5


@pytest.mark.parametrize("schedule,beta_end", [("linear", 0.012), ("scaled_linear", 0.012), ("scaled_linear", 0.020)],
                         ids=["animatediff-linear", "sd-scaled_linear", "sdxl-beta-0.020"])
def test_noise_schedule_equals_diffusers(schedule: str, beta_end: float):
    """alphas_cumprod and the per-timestep sigmas against diffusers' Euler scheduler's own training table
    (``sigmas`` before ``set_timesteps``: t = 999 .. 0, then a final 0)."""
    ours = NoiseSchedule.from_betas(schedule, 0.00085, beta_end)
    theirs = diffusers.EulerDiscreteScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=beta_end)
    assert ours.num_train_timesteps == len(theirs.alphas_cumprod) == 1000
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.sigmas.float(), theirs.sigmas[:-1].flip(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("change,steps,words", [
    ({"sampler": "heun"}, 10, ["sampler", "ddim", "euler_a", "dpmpp_2m", "lcm"]),
    ({"beta_schedule": "cosine"}, 10, ["beta_schedule", "linear", "scaled_linear"]),
    ({"timestep_spacing": "middle"}, 10, ["timestep_spacing", "leading", "trailing", "linspace"]),
    ({"prediction_type": "sample"}, 10, ["prediction_type", "epsilon", "v_prediction"]),
    ({}, 0, ["steps", "1000"]),
    ({}, 1001, ["steps", "1000"]),
    ({"sampler": "lcm"}, 51, ["original_inference_steps"]),
    ({"karras": True}, 10, ["karras", "dpmpp_2m"]),
    ({"sampler": "euler", "eta": 0.5}, 10, ["eta", "ddim"]),
    ({"eta": -1.0}, 10, ["eta"]),
    ({"steps_offset": 1}, 1000, ["steps_offset"]),  # leading timesteps would reach 1000
    ({"beta_start": 0.02, "beta_end": 0.01}, 10, ["beta_start"]),
])
def test_validate_rejects_with_a_helpful_message(change: dict, steps: int, words: list[str]):
    cfg = SamplerConfig(**change)
    with pytest.raises(ConfigError) as info:
        validate(cfg, steps)
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ConfigError):
        sample(cfg, toy_eps, torch.zeros(SHAPE), steps)
