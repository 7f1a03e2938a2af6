"""FreeInit: the low-pass filters and the frequency mix against diffusers' FreeInitMixin (each method, float32),
and the iteration wrapper's bookkeeping (re-noising with the first run's noise, coarse-to-fine step counts).
Measured: filters equal to 1e-7 (ours is vectorised in float64, diffusers loops in Python), mix <= 1e-6."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

from diffusers.pipelines.free_init_utils import FreeInitMixin  # noqa: E402
from vidsynth.errors import ConfigError  # noqa: E402
from vidsynth.pipelines.free_init import FreeInit, free_init_sample, low_pass_filter, mix_frequencies  # noqa: E402

SHAPE = (1, 4, 12, 6, 10)


@pytest.mark.parametrize("method, order, ds, dt", [("butterworth", 4, 0.25, 0.25), ("butterworth", 2, 0.4, 0.2),
                                                   ("gaussian", 4, 0.25, 0.25), ("gaussian", 4, 0.3, 0.6),
                                                   ("ideal", 4, 0.25, 0.25), ("ideal", 4, 0.5, 0.3)])
def test_filters_match_diffusers(method, order, ds, dt):
    want = FreeInitMixin._get_free_init_freq_filter(None, SHAPE, "cpu", method, order, ds, dt)
    got = low_pass_filter(SHAPE, method, order, ds, dt)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-6
    assert 0 < want.sum() < want.numel()  # neither all-pass nor all-stop: the comparison sees the shape
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    mixed = mix_frequencies(x, noise, got)
    assert (mixed - FreeInitMixin._apply_freq_filter(None, x, noise, want)).abs().max() <= 1e-5


def test_zero_stop_frequency_keeps_nothing():
    assert torch.equal(low_pass_filter(SHAPE, spatial_stop_frequency=0), torch.zeros(SHAPE))


def test_iterations_renoise_with_the_first_noise():
    """Each later run starts from mix(sqrt(a) x0 + sqrt(1 - a) noise_0, z) with fresh z from the generator; fast
    sampling runs int(steps / n * (k + 1)) steps, as diffusers."""
    alphas = torch.linspace(0.99, 0.01, 1000)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    calls = []

    def loop(x, steps, iteration):
        calls.append((x.clone(), steps, iteration))
        return 0.5 * x + 1.0

    options = FreeInit(num_iters=3, use_fast_sampling=True, method="gaussian")
    out = free_init_sample(options, loop, noise, 10, alphas_cumprod=alphas, generator=torch.Generator().manual_seed(1))
    assert [c[1:] for c in calls] == [(3, 0), (6, 1), (10, 2)]
    assert torch.equal(calls[0][0], noise)
    g = torch.Generator().manual_seed(1)
    low = low_pass_filter((1, *SHAPE[1:]), "gaussian")
    x = noise
    for k in range(1, 3):
        x0 = 0.5 * x + 1.0
        x = mix_frequencies(alphas[-1].sqrt() * x0 + (1 - alphas[-1]).sqrt() * noise, torch.randn(SHAPE, generator=g), low)
        assert (calls[k][0] - x).abs().max() <= 1e-6
    assert (out - (0.5 * x + 1.0)).abs().max() <= 1e-6
    assert free_init_sample(None, loop, noise, 10, alphas_cumprod=alphas).equal(0.5 * noise + 1.0)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="method"):
        FreeInit(method="box")
    with pytest.raises(ConfigError, match="num_iters"):
        FreeInit(num_iters=0)
    with pytest.raises(ConfigError, match="spatial_stop_frequency"):
        FreeInit(spatial_stop_frequency=1.5)
    with pytest.raises(ConfigError, match="unknown option"):
        FreeInit.parse({"iters": 2})
    assert FreeInit.parse(True) == FreeInit() and FreeInit.parse({"num_iters": 2}).num_iters == 2


# ---- end to end: the pipeline with free_init= --------------------------------------------------------------------

E2E = dict(negative_prompt="", height=64, width=128, num_inference_steps=3)
PROMPT = "a photo of an astronaut riding a horse on mars"
CFG, FRAMES = 7.5, 4


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_pair(family: str, options: dict, **ours_kwargs):
    from test_pipeline_parity import models, scheduler

    version = "sdxl_beta" if family == "sdxl" else "v2"
    _, ours, theirs = models(version)
    theirs.scheduler = scheduler("ddim", version)  # see free_init_on_euler below for why DDIM on both sides
    noise = torch.randn(1, 4, FRAMES, 8, 16, generator=torch.Generator().manual_seed(0))
    final = {}

    def keep(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    theirs.enable_free_init(**options)
    try:
        theirs(PROMPT, guidance_scale=CFG, num_frames=FRAMES, latents=noise.clone(), output_type="latent",
               callback_on_step_end=keep, generator=torch.Generator().manual_seed(9), **E2E)
    finally:
        theirs.disable_free_init()
    got = ours(PROMPT, cfg_scale=CFG, num_frames=FRAMES, latents=noise.clone(), output_type="latent",
               progress_bar=False, sampler="ddim", generator=torch.Generator().manual_seed(9), free_init=options,
               **E2E, **ours_kwargs)
    plain = ours(PROMPT, cfg_scale=CFG, num_frames=FRAMES, latents=noise.clone(), output_type="latent",
                 progress_bar=False, sampler="ddim", **E2E)
    return got, final["latents"], plain


@pytest.mark.parametrize("options", [dict(num_iters=2, method="butterworth"), dict(num_iters=2, method="gaussian"),
                                     dict(num_iters=2, method="ideal", spatial_stop_frequency=0.4),
                                     dict(num_iters=3, use_fast_sampling=True)],
                         ids=["butterworth", "gaussian", "ideal", "fast-sampling"])
def test_pipeline_matches_diffusers_enable_free_init(options):
    """AnimateDiffPipeline.enable_free_init, the same noise and a generator of the same seed for the fresh noise.
    Measured: <= 5e-6 of the latent scale."""
    got, want, plain = run_pair("sd15", options)
    err = rel(got, want)
    print(f"free_init {options}: {err:.1e}")
    assert err <= 1e-4
    assert rel(plain, want) > 1e-2  # the re-initialisation changes the result


def test_sdxl_matches_animatediff_sdxl_free_init():
    """AnimateDiffSDXLPipeline.enable_free_init with DDIM on both sides. (With Euler, diffusers' re-noised latents are
    not multiplied by the scheduler's init_noise_sigma while its first run's are, so its later runs start ~14x too
    small; ours hands every run unit-scale noise that the sampler scales, as the first.)"""
    got, want, plain = run_pair("sdxl", dict(num_iters=2))
    err = rel(got, want)
    print(f"sdxl free_init: {err:.1e}")
    assert err <= 1e-4 and rel(plain, want) > 1e-2


def test_free_init_runs_inside_context_windows():
    """FreeInit wraps the sampler loop, so windows (and FreeNoise) run unchanged inside each iteration: 20 frames
    in 16-frame windows gives the same result as the plain loop run twice by hand with FreeInit's re-noising."""
    from test_pipeline_parity import models

    _, ours, _ = models("v2")
    noise = torch.randn(1, 4, 20, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(cfg_scale=CFG, num_frames=20, height=64, width=64, num_inference_steps=2, output_type="latent",
                  progress_bar=False, sampler="ddim", context_length=16, negative_prompt="")
    got = ours(PROMPT, latents=noise.clone(), generator=torch.Generator().manual_seed(2),
               free_init=dict(num_iters=2), **common)
    first = ours(PROMPT, latents=noise.clone(), **common)
    from vidsynth import sampling
    a = sampling.SamplerConfig(beta_schedule="linear", beta_end=0.012).schedule().alphas_cumprod[-1]  # v2's betas
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
    restart = mix_frequencies(a.sqrt() * first + (1 - a).sqrt() * noise, fresh, low_pass_filter((1, 4, 20, 8, 8)))
    want = ours(PROMPT, latents=restart, **common)
    assert rel(got, want) <= 1e-5


def test_pipeline_refuses_bad_free_init_before_compute():
    from test_pipeline_parity import models

    _, ours, _ = models("v2")
    for bad, match in [(dict(method="box"), "method"), (dict(num_iters=0), "num_iters"), (dict(order=-1), "order")]:
        with pytest.raises(ConfigError, match=match):
            ours(PROMPT, num_frames=4, height=64, width=64, free_init=bad, output_type="latent", progress_bar=False)
