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
