"""Prompt travel: per-frame conditioning from keyframe prompts.

SD 1.5: against diffusers' FreeNoise prompt interpolation (``AnimateDiffFreeNoiseMixin._encode_prompt_free_noise``
with its ``_lerp``) on the tiny random pipeline twin, positive and negative dicts, float32. Measured: <= 2e-7 of the
embedding scale. SDXL (no peer has it): each keyframe text encoded alone by our SDXL conditioning, then diffusers'
linear rule applied by hand to the context (both encoders) and to y (pooled text + time ids).
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

from tiny_models import tiny_sd15, tiny_sdxl  # noqa: E402
from vidsynth.errors import ConfigError  # noqa: E402
from vidsynth.pipelines.prompt_travel import per_frame_conditioning  # noqa: E402

PROMPTS = {0: "a red fox in the snow", 5: "a red fox running through a forest", 9: "a fox asleep under the stars"}
NEGATIVES = {0: "blurry", 6: "low quality, watermark"}
FRAMES = 12


@lru_cache(maxsize=None)
def pipelines(family: str):
    tiny = tiny_sdxl() if family == "sdxl" else tiny_sd15("v2")
    return tiny, tiny.pipeline()


def encoder(pipe):
    def encode(texts):
        cond = pipe.encode_prompts(texts, clip_skip=1, height=64, width=64)
        context = cond.context if cond.context.ndim == 3 else cond.context[:, 0]  # (n, tokens, dim)
        y = None if cond.y is None else (cond.y if cond.y.ndim == 2 else cond.y[:, 0])
        return context, y
    return encode


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_sd15_matches_diffusers():
    from tiny_models import tiny_sd15 as _  # noqa: F401
    tiny, ours = pipelines("sd15")
    theirs = tiny.diffusers_pipeline(diffusers.DDIMScheduler())
    theirs._free_noise_prompt_interpolation_callback = theirs._lerp
    want, _ = theirs._encode_prompt_free_noise(PROMPTS, FRAMES, "cpu", 1, True, negative_prompt=NEGATIVES)
    context, y = per_frame_conditioning(encoder(ours), PROMPTS, NEGATIVES, FRAMES, use_cfg=True)
    assert y is None and context.shape == (2, FRAMES, 77, 32)
    err = rel(context.reshape(2 * FRAMES, 77, 32), want)
    print(f"sd15 prompt travel: {err:.1e}")
    assert err <= 1e-4
    # frames between keyframes really are blends: frame 2 is neither keyframe 0 nor 5
    assert rel(context[1, 2], context[1, 0]) > 1e-2 and rel(context[1, 2], context[1, 5]) > 1e-2


@torch.no_grad()
def test_sdxl_interpolates_both_encoders_and_pooled():
    _, ours = pipelines("sdxl")
    encode = encoder(ours)
    context, y = per_frame_conditioning(encode, PROMPTS, "", FRAMES, use_cfg=True)
    keys = list(PROMPTS) + [FRAMES - 1]
    per_key = [encode([PROMPTS[k]]) for k in PROMPTS] + [encode([PROMPTS[9]])]
    for frame in range(FRAMES):
        i = max(j for j in range(len(keys) - 1) if keys[j] <= frame)
        alpha = (frame - keys[i]) / (keys[i + 1] - keys[i])
        want_c = (1 - alpha) * per_key[i][0][0] + alpha * per_key[i + 1][0][0]
        want_y = (1 - alpha) * per_key[i][1][0] + alpha * per_key[i + 1][1][0]
        assert rel(context[1, frame], want_c) <= 1e-4 and rel(y[1, frame], want_y) <= 1e-4
    negative, _ = encode([""])
    assert rel(context[0], negative.expand(FRAMES, -1, -1)) <= 1e-5
    assert context.shape[-1] == 32 + 48 and y.shape[-1] == 16 + 6 * 8


@torch.no_grad()
def test_long_prompts_pad_to_one_chunk_count():
    """A keyframe needing 2 chunks next to one needing 1: the short one gets an empty chunk (BOS, EOS, padding),
    so every frame has 154 tokens and the 1-chunk keyframe's first 77 tokens are its own encoding."""
    _, ours = pipelines("sd15")
    encode = encoder(ours)
    long = " ".join(["a very long and detailed description of a fox"] * 12)
    context, _ = per_frame_conditioning(encode, {0: "a fox", 4: long}, "", 6, use_cfg=False)
    assert context.shape == (1, 6, 154, 32)
    alone, _ = encode(["a fox"])
    assert rel(context[0, 0, :77], alone[0]) <= 1e-5
    empty_chunk, _ = encode([""])
    assert rel(context[0, 0, 77:], empty_chunk[0]) <= 1e-5


def test_callback_hook():
    _, ours = pipelines("sd15")
    hold = lambda start, end, a, b: torch.cat([a.expand(end - start, *a.shape[1:]), b])  # noqa: E731
    context, _ = per_frame_conditioning(encoder(ours), {0: "a", 4: "b"}, "", 6, use_cfg=False, interpolation=hold)
    assert torch.equal(context[0, 3], context[0, 0]) and torch.equal(context[0, 4], context[0, 5])
    with pytest.raises(ConfigError, match="callback returned shape"):
        per_frame_conditioning(encoder(ours), {0: "a", 4: "b"}, "", 6, False, interpolation=lambda s, e, a, b: a)


@pytest.mark.parametrize("prompt, match", [({1: "a"}, "first keyframe must be frame 0"),
                                           ({0: "a", 12: "b"}, "beyond the video's last frame 11"),
                                           ({0: "a", "8": "b"}, "keys must be int"),
                                           ({0: "a", 2.0: "b"}, "keys must be int"),
                                           ({0: "a", 3: 5}, "values must be str"),
                                           ({}, "empty dict")])
def test_bad_keyframes_are_refused(prompt, match):
    with pytest.raises(ConfigError, match=match):
        per_frame_conditioning(lambda texts: pytest.fail("encoded before checking"), prompt, "", 12, use_cfg=True)


# ---- end to end: prompt dicts through the pipeline ---------------------------------------------------------------

def test_pipeline_prompt_travel_matches_diffusers():
    """AnimateDiffPipeline interpolates prompt dicts only with FreeNoise on; with one FreeNoise window over all 8 frames
    that is plain attention, so ours runs prompt travel without FreeNoise. Same noise, CFG 7.5, 3 DDIM steps.
    Measured: <= 4e-6 of the latent scale."""
    from test_pipeline_parity import models, scheduler

    _, ours, theirs = models("v2")
    theirs.scheduler = scheduler("ddim", "v2")
    prompts, negatives, frames = {0: "a red fox in the snow", 5: "a fox asleep under the stars"}, {0: "", 3: "blurry"}, 8
    noise = torch.randn(1, 4, frames, 8, 16, generator=torch.Generator().manual_seed(0))
    final = {}

    def keep(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    theirs.enable_free_noise(context_length=frames, context_stride=4)
    try:
        theirs(prompts, negative_prompt=negatives, guidance_scale=7.5, num_frames=frames, height=64, width=128,
               num_inference_steps=3, latents=noise.clone(), output_type="latent", callback_on_step_end=keep)
    finally:
        theirs.disable_free_noise()
    got = ours(prompts, negative_prompt=negatives, cfg_scale=7.5, num_frames=frames, height=64, width=128,
               num_inference_steps=3, latents=noise.clone(), output_type="latent", progress_bar=False, sampler="ddim")
    err = rel(got, final["latents"])
    print(f"prompt travel end to end: {err:.1e}")
    assert err <= 1e-4


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_travel_inside_context_windows(family):
    """20 frames in 16-frame windows: a dict of one text equals the plain string, and a second keyframe changes
    the frames after it more than those before it."""
    _, ours = pipelines(family)
    common = dict(cfg_scale=7.5, num_frames=20, height=64, width=128, num_inference_steps=2, output_type="latent",
                  progress_bar=False, context_length=16, negative_prompt="", seed=0)
    plain = ours("a red fox", **common)
    assert rel(ours({0: "a red fox"}, **common), plain) <= 1e-4  # measured 3e-6 (float rounding of the lerp)
    travel = ours({0: "a red fox", 19: "a castle made of glass at night"}, **common)
    change = (travel - plain).abs().mean(dim=(0, 1, 3, 4))
    assert change[15:].mean() > change[:5].mean()


def test_cli_prompt_at(tmp_path):
    """``--prompt-at FRAME:TEXT`` (repeatable; --prompt is frame 0) renders prompt travel and is kept in the recipe."""
    from tiny_files import write_tiny_files
    from vidsynth.cli import main, parse_prompt_at
    from vidsynth.render import read_recipe

    assert parse_prompt_at(["24:a fox: asleep", "0:a fox"]) == {0: "a fox", 24: "a fox: asleep"}
    assert parse_prompt_at(["3:b"], prompt="a") == {0: "a", 3: "b"}
    for bad in (["fox"], ["x:fox"], ["3:"]):
        with pytest.raises(ConfigError, match="FRAME:TEXT"):
            parse_prompt_at(bad)
    with pytest.raises(ConfigError, match="two prompts"):
        parse_prompt_at(["0:b"], prompt="a")
    tiny = write_tiny_files(tmp_path / "models")
    out = tmp_path / "travel"
    assert main(["generate", "--base", str(tiny["base"]), "--motion", str(tiny["motion"]), "--prompt", "a red fox",
                 "--prompt-at", "2:a castle at night", "--size", "32x32", "--frames", "4", "--steps", "1",
                 "--device", "cpu", "-o", f"{out}/"]) == 0
    assert read_recipe(out).prompt == {0: "a red fox", 2: "a castle at night"}
    assert main(["generate", "--base", str(tiny["base"]), "--motion", str(tiny["motion"]), "--prompt-at", "9:late",
                 "--prompt", "a", "--frames", "4", "--size", "32x32", "--steps", "1", "--device", "cpu",
                 "-o", f"{tmp_path}/bad/"]) == 2  # frame 9 of 4: our error, exit 2
