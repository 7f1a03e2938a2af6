"""CLIP vision encoder (IP-Adapter's image encoders) against transformers' CLIPVisionModelWithProjection and
CLIPImageProcessor; full-size random files in the released layouts load strictly.

Measured (float32, tiny random config, 3 layers): image_embeds and penultimate hidden states equal transformers'
outputs (max difference 0.0, same operations); preprocessing equal to CLIPImageProcessorPil's (0.0)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vidsynth.checkpoints import Checkpoint, identify
from vidsynth.errors import ConfigError
from vidsynth.models.vision import CLIPVisionModelWithProjection, VisionEncoderConfig, preprocess
from tiny_models import randomise

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pair():
    import transformers
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                           num_attention_heads=16, patch_size=14, image_size=224, projection_dim=24,
                                           hidden_act="gelu")
    twin = randomise(lambda: transformers.CLIPVisionModelWithProjection(config), seed=5)
    state = twin.state_dict()
    state.setdefault("vision_model.embeddings.position_ids", torch.arange(257)[None])
    ours = CLIPVisionModelWithProjection(VisionEncoderConfig.from_state_dict(state))
    ours.load_state_dict(state, strict=True)
    return ours.eval(), twin


def test_vision_encoder_matches_transformers():
    ours, twin = tiny_pair()
    assert ours.config.layers == 3 and ours.config.projection_dim == 24 and ours.config.image_size == 224
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    embeds, penultimate = ours(pixels)
    ref = twin(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(embeds, ref.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(penultimate, ref.hidden_states[-2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(penultimate, ref.hidden_states[-1], atol=1e-3)  # the layers do differ


def test_preprocess_matches_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              ((300, 417), (511, 256), (224, 224), (100, 90))]
    processor = CLIPImageProcessorPil()
    for image in images:
        ref = processor(images=image, return_tensors="pt").pixel_values
        torch.testing.assert_close(preprocess([image]), ref, atol=1e-5, rtol=0)


def test_bad_pixels_refused():
    ours, _ = tiny_pair()
    with pytest.raises(ConfigError, match="224"):
        ours(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="image prompt"):
        preprocess([np.zeros((8, 8), dtype=np.float32)])


@pytest.mark.parametrize("name,width,layers,projection", [
    ("IP-Adapter_models_image_encoder_model.safetensors", 1280, 32, 1024),
    ("IP-Adapter_sdxl_models_image_encoder_model.safetensors", 1664, 48, 1280)])
def test_full_size_image_encoders_load_strictly(full_checkpoint, name, width, layers, projection):
    """Full size (2.5 / 3.7 GB): run under the bigmem flock, in a subprocess so the memory goes back."""
    path = full_checkpoint(name)
    info = identify(Checkpoint(path))
    assert info.kind == "image_encoder"
    config = info.component("image_encoder").config
    assert (config.width, config.layers, config.projection_dim, config.image_size) == (width, layers, projection, 224)
    script = (f"import torch; from vidsynth.manager import ModelManager\n"
              f"m = ModelManager(torch.bfloat16, 'cpu'); m.load_models([{str(path)!r}])\n"
              f"e = m.fetch_model('image_encoder')\n"
              f"print(e.visual_projection.weight.shape[0], sum(p.numel() for p in e.parameters()))")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    expected = sum(_numel(shape) for key, shape in Checkpoint(path).shapes.items() if not key.endswith("position_ids"))
    assert out == [str(projection), str(expected)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
