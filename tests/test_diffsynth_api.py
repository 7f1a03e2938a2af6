"""DiffSynth-Studio 1.x surface beyond text-to-video: SDImagePipeline / SDXLImagePipeline, VideoData, save_frames;
and the call conveniences diffusers users expect (lists of prompts, callback_on_step_end, SDXL's 1024 default).

Text-to-image parity: ours against diffusers' StableDiffusionPipeline on the tiny SD 1.5 model (same weights, fp32,
DDIM over SD's scaled_linear schedule, fixed latents); max abs error <= 1e-4 of the output scale, measured 2e-6.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

from test_pipeline_parity import TOLERANCE, max_rel_error, models  # noqa: E402
from tiny_models import diffusers_unet2d, diffusers_vae, transformers_text_encoder, transformers_tokenizer  # noqa: E402
from vidsynth import SDImagePipeline, SDXLImagePipeline, VideoData, save_frames, save_video  # noqa: E402
from vidsynth.errors import ConfigError  # noqa: E402

PROMPT = "lightning storm, sea"


def image_pipeline(version: str = "v2"):
    tiny, _, _ = models(version)
    cls = SDXLImagePipeline if tiny.family == "sdxl" else SDImagePipeline
    return tiny, cls(tiny.unet, tiny.vae, tiny.text_encoders, cls.make_tokenizers(), tiny.motion)


def test_sd_image_pipeline_matches_diffusers_text_to_image():
    tiny, pipe = image_pipeline()
    assert pipe.motion_modules is None  # the image model alone, even when a motion module is loaded
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, clip_sample=False, set_alpha_to_one=True)
    theirs = diffusers.StableDiffusionPipeline(
        vae=diffusers_vae(tiny.vae), text_encoder=transformers_text_encoder(tiny.text_encoders[0]),
        tokenizer=transformers_tokenizer(), unet=diffusers_unet2d(tiny.unet), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    want = theirs(PROMPT, negative_prompt="", guidance_scale=7.5, num_inference_steps=4, height=64, width=128,
                  latents=noise, output_type="latent").images
    got = pipe(PROMPT, negative_prompt="", cfg_scale=7.5, num_inference_steps=4, height=64, width=128,
               latents=noise[:, :, None], output_type="latent", progress_bar=False)
    assert got.shape == (1, 4, 8, 16)
    error = max_rel_error(got, want)
    print(f"text-to-image: {error:.1e} of the output scale")
    assert error <= TOLERANCE
    image = pipe(PROMPT, cfg_scale=7.5, num_inference_steps=2, height=64, width=128, progress_bar=False, seed=0)
    assert isinstance(image, Image.Image) and image.size == (128, 64)


def test_image_to_image_and_refusals():
    _, pipe = image_pipeline()
    start = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    a = pipe(PROMPT, input_image=start, denoising_strength=0.5, num_inference_steps=4, height=64, width=64, seed=1,
             output_type="np", progress_bar=False)
    b = pipe(PROMPT, num_inference_steps=4, height=64, width=64, seed=1, output_type="np", progress_bar=False)
    assert a.shape == b.shape == (64, 64, 3) and np.abs(a - b).max() > 0.01
    with pytest.raises(ConfigError, match="one image"):
        pipe(PROMPT, num_frames=4)
    with pytest.raises(ConfigError, match="regional"):
        pipe(PROMPT, local_prompts=["a boat"], masks=[start])


def test_a_list_of_prompts_renders_each_with_its_seed():
    _, pipe, _ = models("v2")
    common = dict(num_frames=4, num_inference_steps=2, height=64, width=64, output_type="latent", progress_bar=False)
    both = pipe(["a fox", "a boat"], seed=10, **common)
    assert isinstance(both, list) and len(both) == 2
    assert torch.equal(both[0], pipe("a fox", seed=10, **common))
    assert torch.equal(both[1], pipe("a boat", seed=11, **common))
    twice = pipe("a fox", seed=10, num_videos_per_prompt=2, **common)
    assert torch.equal(twice[0], both[0]) and not torch.equal(twice[0], twice[1])
    with pytest.raises(ConfigError, match="one per prompt"):
        pipe(["a fox", "a boat"], negative_prompt=["blurry"], **common)


def test_callback_on_step_end_sees_and_can_replace_the_latents():
    _, pipe, _ = models("v2")
    common = dict(num_frames=4, num_inference_steps=3, height=64, width=64, output_type="latent", progress_bar=False,
                  seed=0)
    seen = []

    def watch(p, step, timestep, tensors):
        assert p is pipe
        seen.append((step, timestep, tensors["latents"].clone()))
        return tensors

    result = pipe("a fox", callback_on_step_end=watch, **common)
    assert [s for s, _, _ in seen] == [0, 1, 2] and [t for _, t, _ in seen] == [667.0, 334.0, 1.0]
    assert torch.equal(seen[-1][2], result)  # DDIM's last state is the result
    zeroed = pipe("a fox", callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"] * 0} if i == 2 else k,
                  **common)
    assert zeroed.abs().max() == 0


def test_sdxl_renders_1024_by_default():
    _, pipe, _ = models("sdxl_beta")
    latents = pipe("a fox", num_frames=1, num_inference_steps=1, cfg_scale=1.0, output_type="latent",
                   progress_bar=False, seed=0)
    assert latents.shape == (1, 4, 1, 128, 128)


def test_video_data_reads_on_demand_and_fits_the_size(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 96, 3), dtype=np.uint8) for _ in range(6)]
    path = save_video(np.stack(frames), tmp_path / "clip.mp4", fps=8, quality=10)
    video = VideoData(video_file=path, height=32, width=32)
    assert len(video) == 6 and video[0].size == (32, 32)
    later, earlier = video[4], video[1]  # forward, then back (the file is reopened)
    natural = VideoData(video_file=path)
    assert natural[1].size == (96, 48)
    # centre crop of the 96x48 frame to a square is its middle 48x48, then resized
    want = Image.fromarray(np.asarray(natural[4])[:, 24:72]).resize((32, 32), Image.LANCZOS)
    assert np.abs(np.asarray(later, dtype=int) - np.asarray(want, dtype=int)).mean() < 1
    assert np.abs(np.asarray(earlier, dtype=int) - np.asarray(later, dtype=int)).mean() > 10
    with pytest.raises(IndexError):
        video[6]
    save_frames([video[i] for i in range(3)], tmp_path / "frames")
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["0.png", "1.png", "2.png"]
    folder = VideoData(image_folder=tmp_path / "frames")
    assert len(folder) == 3 and np.array_equal(np.asarray(folder[2]), np.asarray(video[2]))
    with pytest.raises(ConfigError, match="exactly one"):
        VideoData()
