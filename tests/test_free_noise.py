"""FreeNoise: the window fusion inside the motion modules and the noise rescheduling, against diffusers.

Window fusion: one tiny random motion module (ours) and diffusers' AnimateDiffTransformer3D with the same weights whose
transformer block is swapped for diffusers' FreeNoiseTransformerBlock (what ``enable_free_noise`` does), its GroupNorm
patched to per-frame statistics (the original v2 code; see tiny_models.PerFrameGroupNorm). float32, 16 and 24 frames
with complete windows (8/4 and 16/4), each weighting scheme. Measured: <= 3e-7 of the output scale.

Where diffusers departs from the paper the reference is the paper, computed in the test from diffusers' own block parts:
- an end-aligned last window (14 frames, windows [0,8) [4,12) [6,14)): diffusers adds only the tail frames and divides
  them by one scalar weight, scaling them by w[i]/w[-n]; the paper fuses every window over all its frames.
- repeat_context never runs in diffusers (it compares context_length with the string "repeat_context"), so it gives
  plain random noise; ours tiles the first window.
- a list of generators crashes diffusers' shuffle_context (diffusers#13653); ours shuffles each video with its own.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

from tiny_models import PerFrameGroupNorm, diffusers_motion_adapter, tiny_motion, tiny_unet  # noqa: E402
from vidsynth.errors import ConfigError  # noqa: E402
from vidsynth.models.frame_windows import FrameWindows, window_weights  # noqa: E402
from vidsynth.pipelines.free_noise import FreeNoise, initial_noise  # noqa: E402

TOLERANCE = 1e-4
SITE = "down_blocks.1.motion_modules.0"  # 64 channels in the tiny UNet


def free_noise_block(basic, length: int = 16, stride: int = 4, scheme: str = "pyramid"):
    """diffusers' FreeNoiseTransformerBlock with the weights of a BasicTransformerBlock (what enable_free_noise does)."""
    from diffusers.models.attention import FreeNoiseTransformerBlock

    block = FreeNoiseTransformerBlock(
        dim=basic.dim, num_attention_heads=basic.num_attention_heads, attention_head_dim=basic.attention_head_dim,
        cross_attention_dim=basic.cross_attention_dim, activation_fn=basic.activation_fn,
        attention_bias=basic.attention_bias, double_self_attention=basic.double_self_attention,
        positional_embeddings=basic.positional_embeddings, num_positional_embeddings=basic.num_positional_embeddings,
        context_length=length, context_stride=stride, weighting_scheme=scheme)
    block.load_state_dict(basic.state_dict(), strict=True)
    return block.eval()


def motion_pair(per_frame: bool = True):
    """Our module at SITE and diffusers' twin of it with a FreeNoise block."""
    torch.manual_seed(0)
    motion = tiny_motion(tiny_unet(), "v2")
    adapter = diffusers_motion_adapter(motion)
    theirs = adapter.down_blocks[1].motion_modules[0]
    if per_frame:
        theirs.norm = PerFrameGroupNorm(theirs.norm)
    block = free_noise_block(theirs.transformer_blocks[0])
    theirs.transformer_blocks[0] = block
    return motion.get_submodule(SITE), theirs, block


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("scheme", ["pyramid", "flat", "delayed_reverse_sawtooth"])
@pytest.mark.parametrize("frames, length, stride", [(16, 8, 4), (24, 16, 4)])
@torch.no_grad()
def test_window_fusion_matches_diffusers(scheme, frames, length, stride):
    ours, theirs, block = motion_pair()
    block.set_free_noise_properties(length, stride, scheme)
    h = torch.randn(2 * frames, 64, 4, 6, generator=torch.Generator().manual_seed(1))
    want = theirs(h, num_frames=frames)
    got = ours(h, frames, 1.0, FrameWindows(length, stride, scheme))
    err = rel(got, want)
    print(f"{scheme} {frames}/{length}/{stride}: {err:.1e}")
    assert err <= TOLERANCE
    # the windows matter: attention over all frames at once differs (and would exceed the 32-frame PE for long clips)
    assert rel(ours(h, frames, 1.0, None), want) > 100 * TOLERANCE


@torch.no_grad()
def test_incomplete_last_window_follows_the_paper():
    """14 frames, windows of 8 by 4: [0,8) [4,12) and the end-aligned [6,14), each fused over all its frames with its
    pyramid weights (the paper), built here from diffusers' block parts. diffusers' own result differs on the tail."""
    ours, theirs, block = motion_pair()
    frames, length, stride = 14, 8, 4
    block.set_free_noise_properties(length, stride, "pyramid")
    x = torch.randn(3, frames, 64, generator=torch.Generator().manual_seed(2))

    def attend(chunk):
        chunk = block.attn1(block.pos_embed(block.norm1(chunk))) + chunk
        return block.attn2(block.pos_embed(block.norm2(chunk))) + chunk

    weights = torch.tensor([1, 2, 3, 4, 4, 3, 2, 1.0])
    total, count = torch.zeros_like(x), torch.zeros(frames)
    for start in (0, 4, 6):
        total[:, start:start + length] += attend(x[:, start:start + length]) * weights[:, None]
        count[start:start + length] += weights
    fused = total / count[:, None]
    want = block.ff(block.norm3(fused)) + fused
    got = ours.temporal_transformer.transformer_blocks[0](x, FrameWindows(length, stride, "pyramid"))
    assert rel(got, want) <= TOLERANCE
    tail = rel(block(x)[:, 12:], want[:, 12:])
    print(f"diffusers' tail frames differ by {tail:.2f} of their scale")
    assert tail > 100 * TOLERANCE


def test_window_weights_and_spans():
    assert window_weights(8, "pyramid") == [1, 2, 3, 4, 4, 3, 2, 1]
    assert window_weights(5, "pyramid") == [1, 2, 3, 2, 1]
    assert window_weights(4, "delayed_reverse_sawtooth") == [0.01, 2, 2, 1]
    # diffusers' odd sawtooth has n + 1 entries (a bug); ours is the one its comment documents
    assert window_weights(5, "delayed_reverse_sawtooth") == [0.01, 0.01, 3, 2, 1]
    from diffusers.models.attention import FreeNoiseTransformerBlock
    assert len(FreeNoiseTransformerBlock._get_frame_weights(None, 5, "delayed_reverse_sawtooth")) == 6
    for n in (4, 5, 8, 16):
        for scheme in ("pyramid", "flat", "delayed_reverse_sawtooth")[:3 if n % 2 == 0 else 2]:
            assert window_weights(n, scheme) == FreeNoiseTransformerBlock._get_frame_weights(None, n, scheme)
    assert FrameWindows(8, 4).spans(16) == [(0, 8), (4, 12), (8, 16)]
    assert FrameWindows(16, 4).spans(25) == [(0, 16), (4, 20), (8, 24), (9, 25)]
    assert FrameWindows(16, 4).spans(12) == [(0, 12)]


@torch.no_grad()
def test_per_frame_motion_scale():
    """A (frames,) scale weighs each frame's motion delta: frame i equals the float-scale run at scale s[i]."""
    ours, _, _ = motion_pair()
    frames = 8
    h = torch.randn(2 * frames, 64, 4, 4, generator=torch.Generator().manual_seed(3))
    scale = torch.linspace(0, 2, frames)
    got = ours(h, frames, scale).reshape(2, frames, 64, 4, 4)
    for i in (0, 3, 7):
        want = ours(h, frames, float(scale[i])).reshape(2, frames, 64, 4, 4)[:, i]
        assert rel(got[:, i], want) <= 1e-6
    with pytest.raises(ConfigError, match="one value per frame"):
        ours(h, frames, torch.ones(frames + 1))


# ---- noise rescheduling ------------------------------------------------------------------------------------------

def diffusers_noise(noise_type, shape, length, stride, generator, latents=None):
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

    fake = SimpleNamespace(_free_noise_context_length=length, _free_noise_context_stride=stride,
                           _free_noise_noise_type=noise_type, vae_scale_factor=8)
    b, c, f, h, w = shape
    return AnimateDiffFreeNoiseMixin._prepare_latents_free_noise(fake, b, c, f, h * 8, w * 8, torch.float32, "cpu",
                                                                 generator, latents)


@pytest.mark.parametrize("frames, length, stride", [(37, 16, 4), (24, 8, 3), (16, 16, 4)])
def test_shuffle_context_matches_diffusers(frames, length, stride):
    shape = (1, 4, frames, 3, 5)
    want = diffusers_noise("shuffle_context", shape, length, stride, torch.Generator().manual_seed(7))
    got = initial_noise(FreeNoise(length, stride), shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, want)
    # every window after the first holds a permutation of the first window's frames
    first = {tuple(got[0, :, i].flatten()[:4].tolist()) for i in range(length)}
    assert all(tuple(got[0, :, i].flatten()[:4].tolist()) in first for i in range(frames))


def test_random_and_given_latents_match_diffusers():
    shape = (1, 4, 20, 3, 5)
    want = diffusers_noise("random", shape, 8, 4, torch.Generator().manual_seed(3))
    got = initial_noise(FreeNoise(8, 4, noise_type="random"), shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    given = torch.randn(shape)
    assert torch.equal(initial_noise(FreeNoise(8, 4), shape, latents=given), given)  # full length: as it is


def test_repeat_context_follows_the_paper():
    shape = (1, 4, 20, 3, 5)
    got = initial_noise(FreeNoise(8, 4, noise_type="repeat_context"), shape, generator=torch.Generator().manual_seed(3))
    first = torch.randn((1, 4, 8, 3, 5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.cat([first, first, first[:, :, :4]], dim=2))
    theirs = diffusers_noise("repeat_context", shape, 8, 4, torch.Generator().manual_seed(3))
    assert not torch.equal(theirs[:, :, 8:16], theirs[:, :, :8])  # diffusers repeats nothing (its branch never runs)


def test_generator_list_shuffles_each_video():
    shape = (2, 4, 24, 3, 5)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    got = initial_noise(FreeNoise(8, 4), shape, generator=gens)
    for video, seed in enumerate((1, 2)):
        alone = initial_noise(FreeNoise(8, 4), (1, *shape[1:]), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got[video:video + 1], alone)
    with pytest.raises(TypeError):  # diffusers#13653, which ours fixes
        diffusers_noise("shuffle_context", shape, 8, 4, [torch.Generator().manual_seed(1),
                                                         torch.Generator().manual_seed(2)])


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="noise_type"):
        FreeNoise(noise_type="shuffle")
    with pytest.raises(ConfigError, match="weighting_scheme"):
        FreeNoise(weighting_scheme="triangle")
    with pytest.raises(ConfigError, match="native length 32"):
        FreeNoise.parse({"context_length": 48}, native_length=32)
    with pytest.raises(ConfigError, match="unknown option"):
        FreeNoise.parse({"context_lenght": 16}, native_length=32)
    with pytest.raises(ConfigError, match="stride"):
        FreeNoise(context_length=8, context_stride=9)
    assert FreeNoise.parse({"context_length": None}, native_length=24).context_length == 24
    assert FreeNoise.parse(True, 32) == FreeNoise() and FreeNoise.parse(None, 32) is None


# ---- end to end: the pipeline with free_noise= -------------------------------------------------------------------

E2E = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="", height=64, width=128,
           num_inference_steps=2)
CFG = 7.5


def e2e_models(family: str):
    from test_pipeline_parity import models, scheduler  # noqa: F401  (one cached tiny pair per family)
    return models("sdxl_beta" if family == "sdxl" else "v2")


def diffusers_latents(pipe, version: str, frames: int, **kwargs) -> torch.Tensor:
    from test_pipeline_parity import scheduler

    pipe.scheduler = scheduler("euler" if version == "sdxl_beta" else "ddim", version)
    final = {}

    def keep(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    pipe(E2E["prompt"], negative_prompt="", guidance_scale=CFG, num_frames=frames, height=E2E["height"],
         width=E2E["width"], num_inference_steps=E2E["num_inference_steps"], output_type="latent",
         callback_on_step_end=keep, **kwargs)
    return final["latents"]


def video_noise(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, frames, 8, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", ["pyramid", "flat", "delayed_reverse_sawtooth"])
def test_pipeline_matches_diffusers_enable_free_noise(scheme):
    """12 frames, FreeNoise windows of 8 by 4 ([0, 8) and [4, 12)), the same full-length noise (used as is on both
    sides). Measured: <= 3e-6 of the latent scale."""
    from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin  # noqa: F401

    _, ours, theirs = e2e_models("sd15")
    theirs.enable_free_noise(context_length=8, context_stride=4, weighting_scheme=scheme)
    try:
        want = diffusers_latents(theirs, "v2", 12, latents=video_noise(12))
    finally:
        theirs.disable_free_noise()
    got = ours(**E2E, cfg_scale=CFG, num_frames=12, latents=video_noise(12), output_type="latent",
               progress_bar=False, free_noise=dict(context_length=8, context_stride=4, weighting_scheme=scheme))
    err = rel(got, want)
    print(f"free_noise {scheme}: {err:.1e}")
    assert err <= TOLERANCE
    if scheme == "pyramid":  # FreeNoise's windows are not our whole-UNet windows
        plain = ours(**E2E, cfg_scale=CFG, num_frames=12, latents=video_noise(12), output_type="latent",
                     progress_bar=False, context_length=8, context_overlap=4)
        assert rel(plain, want) > 100 * TOLERANCE


def test_pipeline_shuffle_context_seeded_matches_diffusers():
    """No latents: one generator of the same seed draws the noise and then the shuffles, on both sides (16 frames,
    windows of 8 by 4, all complete)."""
    _, ours, theirs = e2e_models("sd15")
    theirs.enable_free_noise(context_length=8, context_stride=4)
    try:
        want = diffusers_latents(theirs, "v2", 16, generator=torch.Generator().manual_seed(5))
    finally:
        theirs.disable_free_noise()
    got = ours(**E2E, cfg_scale=CFG, num_frames=16, seed=5, output_type="latent", progress_bar=False,
               free_noise=dict(context_length=8, context_stride=4))
    assert rel(got, want) <= TOLERANCE


def test_sdxl_free_noise_is_the_sd15_maths_on_sdxl():
    """No peer has FreeNoise for SDXL: diffusers' FreeNoise blocks (as its SD 1.5 enable_free_noise builds them)
    swapped into the SDXL twin's motion modules, run by AnimateDiffSDXLPipeline (Euler) on the same full-length
    noise. Measured: <= 3e-6 of the latent scale."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    _, ours, theirs = e2e_models("sdxl")
    modules = [m for m in theirs.unet.modules() if isinstance(m, AnimateDiffTransformer3D)]
    originals = [m.transformer_blocks[0] for m in modules]
    for module, basic in zip(modules, originals):
        module.transformer_blocks[0] = free_noise_block(basic, 8, 4)
    try:
        want = diffusers_latents(theirs, "sdxl_beta", 12, latents=video_noise(12))
    finally:
        for module, basic in zip(modules, originals):
            module.transformer_blocks[0] = basic
    got = ours(**E2E, cfg_scale=CFG, num_frames=12, latents=video_noise(12), output_type="latent",
               progress_bar=False, sampler="euler", free_noise=dict(context_length=8, context_stride=4))
    err = rel(got, want)
    print(f"sdxl free_noise: {err:.1e}")
    assert err <= TOLERANCE


def seam_ratio(latents: torch.Tensor, boundaries: list[int]) -> tuple[float, float]:
    """Mean |x[f+1] - x[f]| over frame pairs straddling a window boundary, and over all other pairs."""
    x = latents[0].transpose(0, 1)  # (f, 4, h, w)
    steps = (x[1:] - x[:-1]).abs().mean(dim=(1, 2, 3))
    across = [b - 1 for b in boundaries]
    inside = [i for i in range(len(steps)) if i not in across]
    return steps[across].mean().item(), steps[inside].mean().item()


def test_seams_of_a_64_frame_video_are_lower_with_free_noise():
    """64 frames, 16-frame windows, the same noise for both: plain whole-UNet windows (overlap 4: windows start at 0,
    12, 24, 36, 48) against FreeNoise (windows of 16 by 4 inside the motion modules). Seam figure: the mean latent
    step |x[f+1] - x[f]| across the plain windows' boundaries (where one starts or ends) over the mean step elsewhere.

    A random model has no content that could stay coherent, so the noise is one frame repeated over all 64: then any
    step between neighbours comes from the windowing (each frame's window position, i.e. its positional encoding),
    and a seam is where windows hand over. One sampling step (the x0 estimate); several steps of random weights are
    chaotic and the figures jump by seed (measured at 2-4 steps: FreeNoise lower in about 2 of 3 seeds). Measured at
    one step, seeds 0/1/2: plain 2.01 / 0.43 / 1.03, FreeNoise 0.34 / 0.08 / 0.40."""
    _, ours, _ = e2e_models("sd15")
    boundaries = sorted({b for s in (12, 24, 36, 48) for b in (s, s + 4)})
    for seed in range(3):
        still = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).expand(-1, -1, 64, -1, -1)
        common = dict(E2E, cfg_scale=CFG, num_frames=64, height=64, width=64, num_inference_steps=1,
                      latents=still.contiguous(), output_type="latent", progress_bar=False)
        plain = seam_ratio(ours(**common, context_length=16, context_overlap=4), boundaries)
        free = seam_ratio(ours(**common, free_noise=dict(context_length=16, context_stride=4)), boundaries)
        print(f"seed {seed} seams: plain {plain[0] / plain[1]:.2f}, free_noise {free[0] / free[1]:.2f}")
        assert free[0] / free[1] < plain[0] / plain[1]
        assert free[0] < plain[0]


def test_pipeline_refuses_bad_free_noise_before_compute():
    _, ours, _ = e2e_models("sd15")
    encode = ours.encode_prompts
    ours.encode_prompts = lambda *a, **k: pytest.fail("encoded before checking")
    try:
        for bad, match in [(dict(context_length=40), "native length 32"), (dict(noise_type="shuffled"), "noise_type"),
                           (dict(weighting_scheme="cone"), "weighting_scheme")]:
            with pytest.raises(ConfigError, match=match):
                ours(**E2E, num_frames=48, free_noise=bad, output_type="latent", progress_bar=False)
    finally:
        ours.encode_prompts = encode
