"""IP-Adapter end to end: SDVideoPipeline(ipadapter_images=...) against diffusers' AnimateDiffPipeline
(ip_adapter_image=...) with the adapter loaded by diffusers' own loader (``UNet2DConditionLoadersMixin.
_load_ip_adapter_weights``, what ``load_ip_adapter`` calls) and transformers' CLIPVisionModelWithProjection +
CLIPImageProcessor as its image encoder; same tiny random weights, same initial noise, CFG (diffusers' negative
image embeddings are zeros, as ours), DDIM, fp32. Scale 0 is bit-identical to no image prompt; the UNet carries no
hooks after a call.

Measured: latents 2.4e-6 and frames 3.6e-6 of the output scale (two image prompts, scale 0.6); without the image
prompt the latents differ from diffusers' by more than 100x the tolerance (asserted), so the comparison could fail.
SDXL (AnimateDiffSDXLPipeline, Euler, one image, scale 0.8): latents 1.8e-6. InstantStyle's per-site scales equal
those diffusers' set_ip_adapter_scale({"up": {"block_0": [0, s, 0]}}) sets.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

from test_ip_adapter import IMAGE_DIM, our_adapter, tiny_adapter_state  # noqa: E402
from test_pipeline_parity import CFG, max_rel_error, run_diffusers, run_ours, scheduler  # noqa: E402
from tiny_models import randomise, tiny_sd15  # noqa: E402

from vidsynth.errors import ConfigError  # noqa: E402
from vidsynth.models.vision import CLIPVisionModelWithProjection, VisionEncoderConfig  # noqa: E402

TOLERANCE = 1e-4


def image_encoders():
    import transformers
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=16, patch_size=14, image_size=224,
                                           projection_dim=IMAGE_DIM, hidden_act="gelu")
    twin = randomise(lambda: transformers.CLIPVisionModelWithProjection(config), seed=21)
    state = {**twin.state_dict(), "vision_model.embeddings.position_ids": torch.arange(257)[None]}
    ours = CLIPVisionModelWithProjection(VisionEncoderConfig.from_state_dict(state))
    ours.load_state_dict(state, strict=True)
    return ours.eval(), twin


def images():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(2)]


def with_adapter(tiny, sampler: str, version: str):
    """Our pipeline and its diffusers twin, both carrying the same random IP-Adapter and image encoder."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    state = tiny_adapter_state(tiny.unet)
    ours_encoder, their_encoder = image_encoders()
    ours = tiny.pipeline()
    ours.ip_adapter, ours.image_encoder = our_adapter(state), ours_encoder
    theirs = tiny.diffusers_pipeline(scheduler(sampler, version))
    theirs.register_modules(image_encoder=their_encoder, feature_extractor=CLIPImageProcessorPil())
    theirs.unet._load_ip_adapter_weights(state)
    return ours, theirs


@pytest.fixture(scope="module")
def pipelines():
    return with_adapter(tiny_sd15("v2"), "ddim", "v2")


def test_matches_diffusers_animatediff_ip_adapter(pipelines):
    ours, theirs = pipelines
    theirs.set_ip_adapter_scale(0.6)
    want_latents, want_frames = run_diffusers(theirs, "v2", "ddim", ip_adapter_image=[images()])
    latents = run_ours(ours, "ddim", "latent", ipadapter_images=images(), ipadapter_scale=0.6)
    frames = run_ours(ours, "ddim", "np", ipadapter_images=images(), ipadapter_scale=0.6)
    plain = run_ours(ours, "ddim", "latent")
    latent_error, frame_error = max_rel_error(latents, want_latents), max_rel_error(frames, want_frames)
    print(f"latents {latent_error:.1e}, frames {frame_error:.1e} of the output scale")
    assert latent_error <= TOLERANCE and frame_error <= TOLERANCE
    assert max_rel_error(plain, want_latents) > 100 * TOLERANCE  # the image prompt acts
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ours.unet.modules())


def test_scale_zero_is_bit_identical(pipelines):
    ours, _ = pipelines
    plain = run_ours(ours, "ddim", "np")
    zero = run_ours(ours, "ddim", "np", ip_adapter_image=images()[0], ipadapter_scale=0.0)
    assert np.array_equal(np.asarray(plain), np.asarray(zero))


def test_bad_image_prompt_calls_refused(pipelines):
    ours, _ = pipelines
    with pytest.raises(ConfigError, match="SDXL option"):
        run_ours(ours, "ddim", "latent", ipadapter_images=images(), ipadapter_use_instant_style=True)
    with pytest.raises(ConfigError, match="once"):
        run_ours(ours, "ddim", "latent", ipadapter_images=images(), ip_adapter_image=images())
    adapter, ours.ip_adapter = ours.ip_adapter, None
    try:
        with pytest.raises(ConfigError, match="needs an IP-Adapter"):
            run_ours(ours, "ddim", "latent", ipadapter_images=images())
    finally:
        ours.ip_adapter = adapter


def test_instant_style_scales_only_diffusers_style_block():
    """DiffSynth's ipadapter_use_instant_style keeps the adapter in the style block only; diffusers' InstantStyle
    setting for it is ``set_ip_adapter_scale({"up": {"block_0": [0.0, s, 0.0]}})``: the per-site scales agree."""
    from test_pipeline_parity import scheduler as make_scheduler
    from tiny_models import tiny_sdxl
    from vidsynth.ip_adapter import cross_attention_sites
    from vidsynth.pipelines.ip_adapter import ImagePrompt, site_scales

    tiny = tiny_sdxl()
    theirs = tiny.diffusers_pipeline(make_scheduler("euler", "sdxl_beta"))
    theirs.unet._load_ip_adapter_weights(tiny_adapter_state(tiny.unet))
    theirs.set_ip_adapter_scale({"up": {"block_0": [0.0, 0.5, 0.0]}})
    want = [p.scale[0] for name, p in theirs.unet.attn_processors.items()
            if name.endswith("attn2.processor") and "motion_modules" not in name]
    got = site_scales(tiny.unet, ImagePrompt(("image",), 0.5, instant_style=True))
    assert len(got) == len(cross_attention_sites(tiny.unet)) == len(want)
    assert list(got) == want and 0 < got.count(0.5) < len(got)


def test_sdxl_matches_diffusers_animatediff_sdxl_ip_adapter():
    """SDXL: SDXLVideoPipeline(ipadapter_images=...) against AnimateDiffSDXLPipeline(ip_adapter_image=...), Euler."""
    from tiny_models import tiny_sdxl

    ours, theirs = with_adapter(tiny_sdxl(), "euler", "sdxl_beta")
    theirs.set_ip_adapter_scale(0.8)
    want, _ = run_diffusers(theirs, "sdxl_beta", "euler", ip_adapter_image=images()[0])
    got = run_ours(ours, "euler", "latent", ipadapter_images=[images()[0]], ipadapter_scale=0.8)
    plain = run_ours(ours, "euler", "latent")
    error = max_rel_error(got, want)
    print(f"sdxl latents {error:.1e} of the output scale")
    assert error <= TOLERANCE and max_rel_error(plain, want) > 100 * TOLERANCE
