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
