"""The video pipelines on tiny random models: long videos, seeds, outputs, checks before compute."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_models import tiny_motion, tiny_sd15, tiny_sdxl
from vidsynth.errors import ConfigError

SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15("v2")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl()


def run(pipe, **kwargs):
    args = dict(prompt="a fox", num_frames=8, num_inference_steps=2, progress_bar=False, **SIZE)
    args.update(kwargs)
    return pipe(**args)


class FramesSeen:
    """Wraps the UNet and records which latent frames each call received (frames are matched by value)."""

    def __init__(self, pipe):
        self.calls, self.inputs = [], []
        self.unet = pipe.unet
        pipe.unet = self

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, x, *args, **kwargs):
        self.calls.append((x.shape[0], kwargs.get("num_frames")))
        self.inputs.append(x.detach().clone())
        return self.unet(x, *args, **kwargs)

    def frames_of(self, call: int, noise: torch.Tensor) -> list[int]:
        """Which frames of ``noise`` (1, 4, f, h, w) the first-step call ``call`` received (matched by direction:
        the sampler only rescales the noise before the first call)."""
        seen = torch.nn.functional.normalize(self.inputs[call].flatten(1).float(), dim=1)
        frames = torch.nn.functional.normalize(noise[0].transpose(0, 1).flatten(1), dim=1)
        return (seen @ frames.T).argmax(1).tolist()


@pytest.mark.parametrize("closed_loop", [False, True])
def test_long_video_runs_in_blended_windows(sd15, closed_loop):
    pipe = sd15.pipeline()
    spy = FramesSeen(pipe)
    latents = run(pipe, num_frames=48, context_length=16, context_overlap=4, closed_loop=closed_loop,
                  output_type="latent", cfg_scale=7.5)
    assert latents.shape == (1, 4, 48, 8, 8) and torch.isfinite(latents).all()
    windows = 4  # 48 frames, stride 12: starts 0, 12, 24 and 32 (36, wrapping, in a loop)
    assert spy.calls == [(2 * 16, 16)] * (windows * 2)  # every call: one window, cond + uncond, 2 steps
    noise = torch.randn(1, 4, 48, 8, 8, generator=torch.Generator().manual_seed(1))
    spy.calls, spy.inputs = [], []
    run(pipe, num_frames=48, latents=noise, output_type="latent", context_length=16, closed_loop=closed_loop)
    starts = [0, 12, 24, 36] if closed_loop else [0, 12, 24, 32]
    for call, start in enumerate(starts):  # the first step's windows, uncond half then cond half
        expected = [(start + i) % 48 for i in range(16)]
        assert spy.frames_of(call, noise) == expected * 2


def test_frames_beyond_the_native_length_need_windows(sd15):
    pipe = sd15.pipeline()
    with pytest.raises(ConfigError, match="context_length"):
        run(pipe, num_frames=40, context_length=40)


def test_manual_seed_seed_and_latents(sd15):
    pipe = sd15.pipeline()
    torch.manual_seed(0)
    a = run(pipe, output_type="latent")
    torch.manual_seed(0)
    b = run(pipe, output_type="latent")
    assert torch.equal(a, b)
    c = run(pipe, output_type="latent", seed=3)
    d = run(pipe, output_type="latent", seed=3)
    assert torch.equal(c, d) and not torch.equal(a, c)
    noise = torch.randn(1, 4, 8, 8, 8)
    e = run(pipe, output_type="latent", latents=noise)
    f = run(pipe, output_type="latent", latents=noise, seed=99)  # given latents win over the seed
    assert torch.equal(e, f)


def test_output_types(sd15):
    pipe = sd15.pipeline()
    frames = run(pipe, num_frames=5, seed=0)
    assert len(frames) == 5 and frames[0].size == (64, 64) and frames[0].mode == "RGB"
    array = run(pipe, num_frames=5, seed=0, output_type="np")
    assert array.shape == (5, 64, 64, 3) and array.dtype == np.float32 and 0 <= array.min() and array.max() <= 1
    assert np.abs(np.asarray(frames[2], dtype=np.float32) / 255 - array[2]).max() <= 1 / 255 + 1e-6


def test_motion_scale_zero_is_the_image_model_frame_by_frame(sd15):
    pipe = sd15.pipeline()
    same = dict(seed=0, output_type="latent", beta_schedule="linear")  # the image model's default is scaled_linear
    still = run(pipe, motion_scale=0.0, **same)
    moving = run(pipe, **same)
    pipe.motion_modules = None
    static = run(pipe, allow_static=True, **same)
    assert torch.allclose(still, static, atol=1e-5) and not torch.allclose(moving, static, atol=1e-3)


def test_long_prompts_and_diffsynth_window_names(sd15):
    pipe = sd15.pipeline()
    long_prompt = ", ".join(["a beautiful highly detailed photograph of a red fox in the snow"] * 8)
    a = run(pipe, prompt=long_prompt, seed=0, output_type="latent", num_frames=20, context_length=16,
            context_overlap=8)
    b = run(pipe, prompt=long_prompt, seed=0, output_type="latent", num_frames=20, animatediff_batch_size=16,
            animatediff_stride=8)
    assert torch.equal(a, b)


def test_tokens_past_77_change_the_video(sd15):
    """Truncating at CLIP's 77 positions would render both prompts alike: they differ only after token 100."""
    pipe = sd15.pipeline()
    head = ", ".join(["a beautiful highly detailed photograph of a red fox in the snow"] * 8)
    assert len(pipe.tokenizers[0].encode(head)) > 100
    a, b = (run(pipe, prompt=f"{head}, {tail}", seed=0, output_type="latent", num_frames=4)
            for tail in ("purple sky", "green grass"))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("bad,match", [
    (dict(height=60), "multiples of 8"),
    (dict(width=0), "multiples of 8"),
    (dict(num_frames=0), "num_frames"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(num_inference_steps=0), "steps"),
    (dict(sampler="heun3"), "ddim"),
    (dict(output_type="mp4"), "output_type"),
    (dict(clip_skip=0), "clip_skip"),
    (dict(latents=torch.zeros(1, 4, 3, 8, 8)), "latents must have shape"),
    (dict(context_overlap=16, num_frames=40, context_length=16), "context_overlap"),
    (dict(strenght=0.5), "unexpected argument"),
    (dict(strength=0.5), "needs input_frames"),
    (dict(input_frames=[], denoising_strength=0.5), "input_frames"),
    (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(prompt=None), "prompt"),
])
def test_bad_arguments_are_refused_before_any_compute(sd15, bad, match):
    pipe = sd15.pipeline()
    spy = FramesSeen(pipe)
    with pytest.raises(ConfigError, match=match):
        run(pipe, **bad)
    assert spy.calls == []


def test_missing_or_unfit_motion_module_is_refused(sd15, sdxl):
    pipe = sd15.pipeline()
    pipe.motion_modules = None
    with pytest.raises(ConfigError, match="allow_static=True"):
        run(pipe)
    pipe.motion_modules = tiny_motion(sdxl.unet, "sdxl_beta")
    with pytest.raises(ConfigError, match="does not fit"):
        run(pipe)


def test_sdxl_eighty_frames_in_windows(sdxl):
    pipe = sdxl.pipeline()
    spy = FramesSeen(pipe)
    frames = run(pipe, num_frames=80, context_length=16, num_inference_steps=1, cfg_scale=1.0, output_type="np",
                 original_size=(64, 64), target_size=(64, 64))
    assert frames.shape == (80, 64, 64, 3) and np.isfinite(frames).all()
    assert len(spy.calls) == 7 and all(call == (16, 16) for call in spy.calls)  # no CFG at scale 1: one clip a call


def test_decode_keeps_frames_whole_up_to_sdxl_size(sd15):
    pipe = sd15.pipeline()
    x0 = torch.randn(3, 4, 8, 72, generator=torch.Generator().manual_seed(0))  # wider than one 64-latent tile
    with torch.no_grad():
        ours = pipe.decode(x0, output_type="pt", batch_size=None, tiled=None, progress_bar=False)
        whole = ((pipe.vae.decode(x0 / pipe.vae.scaling_factor, tile=False).clamp(-1, 1) + 1) / 2)
        tiled = pipe.decode(x0, output_type="pt", batch_size=1, tiled=True, progress_bar=False)
    assert torch.allclose(ours, whole, atol=1e-5)
    assert not torch.allclose(tiled, whole, atol=1e-3)


# max abs error over every pixel of the 4 frames (values in [0, 1]), measured on this test's tiny random models:
# bfloat16 0.117 (8 mantissa bits), float16 0.0074; bounds at about 1.7x and 2.7x those
MAX_HALF_ERROR = {torch.bfloat16: 0.2, torch.float16: 0.02}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_end_to_end_and_stays_close(dtype):
    reference = run(tiny_sd15("v2").pipeline(), seed=0, num_frames=4, output_type="np")
    models = tiny_sd15("v2")
    for module in (models.unet, models.vae, *models.text_encoders, models.motion):
        module.to(dtype)
    pipe = models.pipeline()
    assert pipe.dtype == dtype
    frames = run(pipe, seed=0, num_frames=4, output_type="np")
    error = np.abs(frames - reference).max()  # frames in [0, 1]
    print(f"{dtype}: max |frame - float32 frame| = {error:.4f}")
    assert np.isfinite(frames).all() and error < MAX_HALF_ERROR[dtype]
