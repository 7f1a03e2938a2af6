"""SparseCtrl end to end: SDVideoPipeline(sparsectrl_images=..., sparsectrl_frame_indices=...) against diffusers'
AnimateDiffSparseControlNetPipeline (scribble) on the same tiny random weights, same noise, CFG, DDIM, fp32. Both
motion-module sets are patched to the original's per-frame GroupNorm (see test_sparsectrl.py). Keyframes mapped to
context windows; indices outside the video refused before compute.

Measured: latents 1.7e-6 and frames 3.5e-6 of the output scale (scribble keyframes at 0 and -1, scale 0.9); without
the keyframes the latents differ by more than 100x the tolerance (asserted).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

from test_pipeline_parity import FRAMES, HEIGHT, WIDTH, max_rel_error, run_diffusers, run_ours, scheduler  # noqa: E402
from test_sparsectrl import pair  # noqa: E402
from tiny_models import motion_unet, tiny_sd15, transformers_text_encoder, transformers_tokenizer, diffusers_vae  # noqa: E402

from vidsynth.errors import ConfigError  # noqa: E402
from vidsynth.pipelines.context import context_windows  # noqa: E402

TOLERANCE = 1e-4


def keyframes():
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture(scope="module")
def pipelines():
    tiny = tiny_sd15("v3")
    ours_net, their_net = pair("scribble")
    ours = tiny.pipeline()
    ours.sparsectrl = ours_net
    unet, adapter = motion_unet(tiny.unet, tiny.motion)
    theirs = diffusers.AnimateDiffSparseControlNetPipeline(
        vae=diffusers_vae(tiny.vae), text_encoder=transformers_text_encoder(tiny.text_encoders[0]),
        tokenizer=transformers_tokenizer(), unet=unet, motion_adapter=adapter, controlnet=their_net,
        scheduler=scheduler("ddim", "v3"))
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def test_matches_diffusers_sparsectrl_pipeline(pipelines):
    ours, theirs = pipelines
    want_latents, want_frames = run_diffusers(theirs, "v3", "ddim", conditioning_frames=keyframes(),
                                              controlnet_frame_indices=[0, FRAMES - 1],
                                              controlnet_conditioning_scale=0.9)
    kwargs = dict(sparsectrl_images=keyframes(), sparsectrl_frame_indices=[0, -1], sparsectrl_scale=0.9)
    latents = run_ours(ours, "ddim", "latent", **kwargs)
    frames = run_ours(ours, "ddim", "np", **kwargs)
    plain = run_ours(ours, "ddim", "latent")
    latent_error, frame_error = max_rel_error(latents, want_latents), max_rel_error(frames, want_frames)
    print(f"latents {latent_error:.1e}, frames {frame_error:.1e} of the output scale")
    assert latent_error <= TOLERANCE and frame_error <= TOLERANCE
    assert max_rel_error(plain, want_latents) > 100 * TOLERANCE


def test_keyframes_follow_context_windows(pipelines):
    """8 frames in windows of 4 (overlap 2), a keyframe at 5: each window's SparseCtrl call sees its own frames'
    mask (the keyframe where the window holds frame 5, zeros elsewhere)."""
    ours, _ = pipelines
    seen = []
    original = ours.sparsectrl.forward

    def spy(x, condition, mask, *args, **kwargs):
        seen.append(mask[:4, 0, 0, 0].tolist())  # the unconditional clip's 4 frames (the conditional one repeats them)
        return original(x, condition, mask, *args, **kwargs)

    ours.sparsectrl.forward = spy
    try:
        ours("a cat", cfg_scale=7.5, num_frames=8, height=HEIGHT, width=WIDTH, num_inference_steps=1,
             context_length=4, context_overlap=2, sparsectrl_images=keyframes()[:1], sparsectrl_frame_indices=[5],
             output_type="latent", progress_bar=False, seed=0)
    finally:
        del ours.sparsectrl.forward
    windows = context_windows(8, 4, 2, False)
    assert len(windows) > 1 and any(5 not in w for w in windows)
    assert seen == [[1.0 if f == 5 else 0.0 for f in w] for w in windows]


@pytest.mark.parametrize("indices", [[8], [-9], [0, 0]])
def test_bad_keyframe_indices_refused(pipelines, indices):
    ours, _ = pipelines
    images = (keyframes() * 2)[:len(indices)]
    with pytest.raises(ConfigError, match="outside the 8-frame video|one frame twice"):
        ours("a cat", num_frames=8, height=HEIGHT, width=WIDTH, sparsectrl_images=images,
             sparsectrl_frame_indices=indices, output_type="latent", progress_bar=False)
