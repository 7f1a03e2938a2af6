"""Video-to-video and image-to-video (``input_frames`` + ``denoising_strength``) against diffusers'
AnimateDiffVideoToVideoPipeline on the tiny random models of test_pipeline_parity (same weights, fp32).

Both sides encode the frames to a posterior sample, then draw the noise in (1, f, 4, h, w) order from the same seeded
CPU generator, noise the latents to the first of the ``int(steps * strength)`` steps that run, and sample from there.
Tolerance as the text-to-video parity: max abs error <= 1e-4 of the output's largest magnitude. Measured: latents
<= 3e-6, frames <= 4e-6 relative (DDIM, DPM++ 2M, Euler).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

from test_pipeline import FramesSeen  # noqa: E402
from test_pipeline_parity import CFG, FRAMES, HEIGHT, PROMPT, TOLERANCE, max_rel_error, models, scheduler  # noqa: E402
from vidsynth.errors import ConfigError  # noqa: E402

STEPS, STRENGTH = 5, 0.6  # 3 of 5 steps run


def input_video(frames: int = FRAMES, width: int = 128, height: int = HEIGHT) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # a moving pattern, so frames differ and a frame swap would show
    return [Image.fromarray(np.roll(base, 4 * i, axis=1)) for i in range(frames)]


def diffusers_v2v(version: str, sampler: str, video, **kwargs):
    _, _, base = models(version)
    pipe = diffusers.AnimateDiffVideoToVideoPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler(sampler, version)
    final = {}

    def keep(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    frames = pipe(video=video, prompt=PROMPT, negative_prompt="", guidance_scale=CFG, num_inference_steps=STEPS,
                  height=HEIGHT, width=video[0].width, output_type="np", callback_on_step_end=keep,
                  generator=torch.Generator().manual_seed(5), **kwargs).frames[0]
    return final["latents"], frames


def ours_v2v(version: str, sampler: str, video, output_type: str, **kwargs):
    _, ours, _ = models(version)
    return ours(PROMPT, negative_prompt="", cfg_scale=CFG, num_inference_steps=STEPS, height=HEIGHT,
                width=video[0].width, sampler=sampler, output_type=output_type, progress_bar=False, seed=5,
                input_frames=video, **kwargs)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler"])
def test_video_to_video_matches_diffusers(sampler: str):
    video = input_video()
    want_latents, want_frames = diffusers_v2v("v2", sampler, video, strength=STRENGTH)
    latents = ours_v2v("v2", sampler, video, "latent", denoising_strength=STRENGTH)
    frames = ours_v2v("v2", sampler, video, "np", strength=STRENGTH)  # diffusers' name works too
    latent_error, frame_error = max_rel_error(latents, want_latents), max_rel_error(frames, want_frames)
    print(f"v2v {sampler}: latents {latent_error:.1e}, frames {frame_error:.1e} of the output scale")
    assert latent_error <= TOLERANCE and frame_error <= TOLERANCE
    # the input matters: another video moves the result far beyond the tolerance
    other = ours_v2v("v2", sampler, input_video()[::-1], "latent", denoising_strength=STRENGTH)
    assert max_rel_error(other, want_latents) > 100 * TOLERANCE


def test_image_to_video_is_one_image_repeated():
    """DiffSynth's image-to-video: ``input_frames=[image] * n``; the result starts from that image."""
    image = input_video(1)[0]
    want_latents, _ = diffusers_v2v("v2", "ddim", [image] * FRAMES, strength=0.4)
    got = ours_v2v("v2", "ddim", [image] * FRAMES, "latent", denoising_strength=0.4)
    assert max_rel_error(got, want_latents) <= TOLERANCE


def test_low_strength_keeps_the_input_and_runs_fewer_steps():
    tiny, ours, _ = models("v2")
    video = input_video()
    spy = FramesSeen(ours)
    try:
        latents = ours_v2v("v2", "ddim", video, "latent", denoising_strength=0.2)  # int(5 * 0.2) = 1 step
    finally:
        ours.unet = spy.unet
    assert len(spy.calls) == 1
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in video]).permute(0, 3, 1, 2)
    with torch.no_grad():
        clean = ours.vae.encode(pixels / 127.5 - 1) * ours.vae.scaling_factor  # posterior means (f, 4, h, w)
    clean = clean.transpose(0, 1).unsqueeze(0)
    from_noise = ours(PROMPT, negative_prompt="", cfg_scale=CFG, num_inference_steps=STEPS, height=HEIGHT, width=128,
                      num_frames=FRAMES, output_type="latent", progress_bar=False, seed=5)
    ratio = ((latents - clean).abs().mean() / (from_noise - clean).abs().mean()).item()
    print(f"strength 0.2 lands {ratio:.2f} of a fresh render's distance from the input latents")
    assert ratio < 0.1  # measured 0.02


def test_strength_one_starts_from_pure_noise_as_diffsynth():
    _, ours, _ = models("v2")
    video = input_video()
    with_frames = ours_v2v("v2", "ddim", video, "latent", denoising_strength=1.0)
    text_only = ours(PROMPT, negative_prompt="", cfg_scale=CFG, num_inference_steps=STEPS, height=HEIGHT, width=128,
                     num_frames=FRAMES, output_type="latent", progress_bar=False, seed=5)
    assert torch.equal(with_frames, text_only)


@pytest.mark.parametrize("bad,match", [
    (dict(denoising_strength=0.0), r"denoising_strength \(strength\) must be in \(0, 1\]"),
    (dict(denoising_strength=1.5), r"must be in \(0, 1\]"),
    (dict(num_frames=FRAMES + 1), "input_frames has 4 frames but num_frames=5"),
    (dict(denoising_strength=0.1), "runs no step"),
])
def test_bad_video_to_video_calls_are_refused_before_compute(bad, match):
    _, ours, _ = models("v2")
    spy = FramesSeen(ours)
    try:
        with pytest.raises(ConfigError, match=match):
            ours_v2v("v2", "ddim", input_video(), "latent", **{"denoising_strength": 0.5, **bad})
        assert spy.calls == []
    finally:
        ours.unet = spy.unet


def test_frames_of_another_size_are_resized(caplog):
    _, ours, _ = models("v2")
    small = [im.resize((64, 32)) for im in input_video()]
    with caplog.at_level("WARNING"):
        latents = ours(PROMPT, cfg_scale=CFG, num_inference_steps=STEPS, height=HEIGHT, width=128, sampler="ddim",
                       output_type="latent", progress_bar=False, seed=5, input_frames=small, denoising_strength=0.5)
    assert latents.shape == (1, 4, FRAMES, HEIGHT // 8, 16) and "resized to 128x64" in caplog.text
