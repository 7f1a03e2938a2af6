"""End-to-end parity of SDVideoPipeline / SDXLVideoPipeline with diffusers' AnimateDiff pipelines.

Tiny random models (tests/tiny_models.py) with the same weights on both sides, fp32, the same initial noise
(1, 4, f, h/8, w/8), negative_prompt="" on both sides (diffusers' SDXL pipeline zeroes a *missing* negative prompt),
CFG 7.5; the final latents and the decoded "np" frames are compared.

The diffusers twins are patched where diffusers departs from the original models (see tiny_models.motion_unet):
v1/v2 motion modules normalise each frame (diffusers pools over frames; SDXL beta pools, like diffusers: no patch);
v1's resnets pool their GroupNorm over the clip (diffusers: per frame).

Size: 64x128 pixels (8x16 latents, non-square so a swapped height/width fails), 4 frames, 3 steps. Not smaller: at
8x8 latents the deepest level is 1x1, where GroupNorm normalises 2 values per group and the random model becomes
ill-conditioned (diffusers' own fp32 and fp64 runs then differ by 5e-3 of the latent scale).
Tolerance: max abs error <= 1e-4 of the output's largest magnitude (latents ~20 with CFG 7.5, frames 1). Measured:
latents <= 3e-6 relative, frames <= 6e-6; seeded runs <= 6e-6.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

from tiny_models import TinyVideoModels, tiny_sd15, tiny_sdxl  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"
FRAMES, HEIGHT, WIDTH, STEPS, CFG = 4, 64, 128, 3, 7.5
TOLERANCE = 1e-4




def scheduler(sampler: str, version: str):
    """The diffusers scheduler our sampler reproduces, with the motion module's original noise schedule: AnimateDiff
    v1/v2/v3 linear betas to 0.012, the SDXL beta module scaled_linear to 0.020; leading spacing, steps_offset 1."""
    betas = ("scaled_linear", 0.020) if version == "sdxl_beta" else ("linear", 0.012)
    common = dict(beta_schedule=betas[0], beta_start=0.00085, beta_end=betas[1], steps_offset=1,
                  timestep_spacing="trailing" if version == "lightning" else "leading")  # Lightning's model card
    if sampler == "lcm":  # AnimateLCM's own scheduler config: LCM over a 100-step distillation grid
        return diffusers.LCMScheduler(**common, original_inference_steps=100)
    if sampler == "ddim":  # set_alpha_to_one: DDIMScheduler's default, which the original AnimateDiff code keeps
        return diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**common)
    return diffusers.EulerDiscreteScheduler(**common)


@lru_cache(maxsize=None)  # a few MB per version; built once per session
def models(version: str) -> tuple[TinyVideoModels, object, object]:
    tiny = tiny_sdxl() if version == "sdxl_beta" else tiny_sd15(version)
    return tiny, tiny.pipeline(), tiny.diffusers_pipeline(scheduler("ddim", version))


def noise() -> torch.Tensor:
    return torch.randn(1, 4, FRAMES, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))


def run_diffusers(pipe, version: str, sampler: str, cfg: float = CFG, **kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """(final latents, frames (f, H, W, 3)) of one diffusers run; the latents are those of its last step, which
    output_type="latent" would return."""
    pipe.scheduler = scheduler(sampler, version)
    final = {}

    def keep_latents(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    frames = pipe(PROMPT, negative_prompt="", guidance_scale=cfg, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                  num_inference_steps=STEPS, output_type="np", callback_on_step_end=keep_latents,
                  **{"latents": noise(), **kwargs}).frames
    return final["latents"], frames[0]


def run_ours(pipe, sampler: str, output_type: str, cfg: float = CFG, **kwargs):
    return pipe(PROMPT, negative_prompt="", cfg_scale=cfg, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                num_inference_steps=STEPS, sampler=sampler, output_type=output_type, progress_bar=False,
                **{"latents": noise(), **kwargs})


def max_rel_error(ours, theirs) -> float:
    ours, theirs = torch.as_tensor(ours), torch.as_tensor(theirs)
    assert ours.shape == theirs.shape
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


CASES = [("v2", "ddim"), ("v2", "dpmpp_2m"), ("v1", "ddim"), ("sdxl_beta", "euler")]


@pytest.mark.parametrize("version, sampler", CASES,
                         ids=["sd15-v2-ddim", "sd15-v2-dpmpp_2m", "sd15-v1-ddim", "sdxl-beta-euler"])
def test_matches_diffusers(version: str, sampler: str):
    tiny, ours, theirs = models(version)
    assert tiny.motion.config.version == version
    want_latents, want_frames = run_diffusers(theirs, version, sampler)
    latents = run_ours(ours, sampler, "latent")
    frames = run_ours(ours, sampler, "np")
    latent_error, frame_error = max_rel_error(latents, want_latents), max_rel_error(frames, want_frames)
    print(f"{version} {sampler}: latents {latent_error:.1e}, frames {frame_error:.1e} of the output scale")
    assert latent_error <= TOLERANCE
    assert frame_error <= TOLERANCE
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and 0 <= frames.min() and frames.max() <= 1
    # what the comparison can see: the motion modules move the result by far more than the tolerance
    static = run_ours(ours, sampler, "latent", motion_scale=0.0)
    assert max_rel_error(static, want_latents) > 100 * TOLERANCE


@pytest.mark.parametrize("version", ["v3", "animatelcm", "lightning"])
def test_module_defaults_match_diffusers(version: str):
    """Each module with its own sampler and guidance (v3: DDIM, cfg 7.5; AnimateLCM: LCM, cfg 1.5; Lightning:
    trailing Euler, no CFG), seeded so LCM's per-step noise is drawn alike, against diffusers set up the same way.
    Measured max errors, latents / frames, relative to the output scale: v3 2.4e-6 / 3.2e-6, AnimateLCM 4.4e-7 /
    1.5e-6, Lightning 3.1e-7 / 1.3e-6."""
    tiny, ours, theirs = models(version)
    assert tiny.motion.config.version == version
    defaults = tiny.motion.config.sampling_defaults()
    sampler, cfg = defaults["sampler"], defaults["cfg_scale"]
    want, want_frames = run_diffusers(theirs, version, sampler, cfg, latents=None,
                                      generator=torch.Generator().manual_seed(5))
    got = ours(PROMPT, negative_prompt="", num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
               output_type="latent", progress_bar=False, seed=5)  # sampler and cfg: the module's defaults
    frames = run_ours(ours, sampler, "np", cfg, latents=None, seed=5)
    latent_error, frame_error = max_rel_error(got, want), max_rel_error(frames, want_frames)
    print(f"{version} {sampler} cfg {cfg}: latents {latent_error:.1e}, frames {frame_error:.1e} of the output scale")
    assert latent_error <= TOLERANCE and frame_error <= TOLERANCE
    assert max_rel_error(run_ours(ours, sampler, "latent", cfg, latents=None, seed=5, motion_scale=0.0),
                         want) > 100 * TOLERANCE  # the motion module is part of what was compared


@pytest.mark.parametrize("version, sampler, options", [
    ("v2", "euler_a", {}),
    ("v2", "ddim", {"eta": 0.7}),
    ("sdxl_beta", "euler_a", {"original_size": (96, 80), "crops_coords_top_left": (8, 16)}),
], ids=["sd15-euler_a", "sd15-ddim-eta", "sdxl-euler_a-size-crop"])
def test_seeded_noise_draws_match_diffusers(version: str, sampler: str, options: dict):
    """No latents given: a seed on our side and a CPU generator of the same seed on diffusers' draw the same initial
    noise and the same per-step noise (ancestral, DDIM eta), in the same order."""
    _, ours, theirs = models(version)
    want, _ = run_diffusers(theirs, version, sampler, latents=None, generator=torch.Generator().manual_seed(5),
                            **options)
    got = run_ours(ours, sampler, "latent", latents=None, seed=5, **options)
    assert max_rel_error(got, want) <= TOLERANCE
    assert max_rel_error(run_ours(ours, sampler, "latent", latents=None, seed=6, **options), want) > 100 * TOLERANCE


@torch.no_grad()
@pytest.mark.parametrize("version", ["v2", "sdxl_beta"], ids=["sd15", "sdxl"])
def test_clip_skip_matches_diffusers(version: str):
    """Our clip_skip counts from the last layer (1 = none), diffusers' counts skipped layers: ours k is theirs k-1."""
    _, ours, theirs = models(version)
    cond = ours.encode_prompts(["", PROMPT], clip_skip=2, height=HEIGHT, width=WIDTH)
    if version == "sdxl_beta":  # diffusers' SDXL ignores clip_skip for the negative prompt: compare the prompt only
        want, *_ = theirs.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False, clip_skip=1)
        got = cond.context[1:]
    else:  # diffusers' SD clip_skip path reads text_encoder.text_model, which transformers 5 dropped: its steps
        ids = theirs.tokenizer(["", PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
        encoder = theirs.text_encoder
        want = encoder.final_layer_norm(encoder(ids, output_hidden_states=True).hidden_states[-2])
        got = cond.context
    assert max_rel_error(got, want) <= TOLERANCE
    default = ours.encode_prompts(["", PROMPT], clip_skip=1, height=HEIGHT, width=WIDTH)
    assert max_rel_error(default.context, cond.context) > 100 * TOLERANCE
