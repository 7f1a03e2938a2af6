"""ModelManager on full-size random files in the real layouts: identification, strict loading, a forward pass."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vidsynth import ModelManager
from vidsynth.checkpoints import identify, load_checkpoint
from vidsynth.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def sd15_manager(full_checkpoint):
    # ~40 s: a 2 GB float16 file read into float32 modules
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([full_checkpoint("v1-5-pruned-emaonly.safetensors", dtype="float16"),
                         full_checkpoint("mm_sd_v15_v2.ckpt", dtype="float16")])
    return manager


def test_sd15_single_file_is_identified_with_its_configuration(full_checkpoint):
    _, info = load_checkpoint(full_checkpoint("v1-5-pruned-emaonly.safetensors", dtype="float16"))
    assert info.kind == "sd15" and info.family == "sd15" and info.num_tensors == 1131
    assert [c.name for c in info.components] == ["unet", "vae", "text_encoder"]
    unet = info.component("unet").config
    assert (unet.model_channels, unet.channel_mult, unet.context_dim) == (320, (1, 2, 4, 4), 768)
    assert info.component("text_encoder").config.layers == 12
    assert info.dtype == torch.float16


def test_sd15_loads_strictly_and_runs_a_unet_forward(sd15_manager):
    manager = sd15_manager
    assert manager.family == "sd15"
    for name in ("unet", "vae", "text_encoder", "motion_modules"):
        module = manager.fetch_model(name)
        assert module is not None
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())
        assert not any(t.is_meta for t in (*module.parameters(), *module.buffers()))
    assert manager.vae.scaling_factor == 0.18215
    assert manager.motion_modules.config.version == "v2" and len(manager.motion_modules.sites()) == 21
    latent = torch.randn(1, 4, 64, 64)
    context = torch.randn(1, 77, 768)
    with torch.no_grad():
        out = manager.unet(latent, torch.tensor([500.0]), context)
    assert out.shape == latent.shape and torch.isfinite(out).all()


def test_motion_module_of_the_other_family_is_refused(sd15_manager, full_checkpoint):
    with pytest.raises(ConfigError, match="sdxl"):
        sd15_manager.load_model(full_checkpoint("mm_sdxl_v10_beta.ckpt", dtype="float16"))


def test_unknown_file_lists_what_was_found(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mystery.safetensors"
    save_file({"transformer_blocks.0.weight": torch.zeros(2), "pos_embed.proj.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as err:
        ModelManager(torch_dtype=torch.float32, device="cpu").load_model(path)
    message = str(err.value)
    assert "mystery.safetensors" in message and "transformer_blocks" in message and "Supported kinds" in message


class _ShapesOnly:
    """What identify() reads of a checkpoint: its path and key -> shape, no tensors."""

    def __init__(self, name, shapes):
        self.path, self.shapes = Path(name), shapes

    def main_dtype(self):
        return torch.float16


@pytest.mark.parametrize("name,change,expected", [
    ("sd2.safetensors", lambda k, s: [s[0], 1024] if "attn2.to_k" in k or "attn2.to_v" in k else s,
     "Stable Diffusion 2"),
    ("inpaint.safetensors", lambda k, s: [s[0], 9, *s[2:]] if k.endswith("input_blocks.0.0.weight") else s,
     "inpainting"),
])
def test_recognised_but_unsupported_layouts_say_so(shared_dir, name, change, expected):
    layout = json.loads((shared_dir / "checkpoint-layouts" / "v1-5-pruned-emaonly.safetensors.json").read_text())
    shapes = {k: tuple(change(k, s)) for k, s in layout["tensors"].items()}
    with pytest.raises(CheckpointError, match=expected) as err:
        identify(_ShapesOnly(name, shapes))
    assert name in str(err.value) and "not supported yet" in str(err.value)


def test_text_encoder_file_without_position_ids_loads(tmp_path):
    from safetensors.torch import save_file

    from vidsynth.models.text import CLIPTextModel, TextEncoderConfig

    config = TextEncoderConfig(vocab_size=1000, width=64, layers=1, heads=1, max_positions=77,
                               activation="quick_gelu", projection_dim=None, layout="hf")
    state = {k: v for k, v in CLIPTextModel(config).state_dict().items() if not k.endswith("position_ids")}
    save_file(state, tmp_path / "clip.safetensors")
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    assert manager.load_model(tmp_path / "clip.safetensors").kind == "text_encoder"
    ids = manager.text_encoder.text_model.embeddings.position_ids
    assert torch.equal(ids, torch.arange(77).expand(1, 77))
