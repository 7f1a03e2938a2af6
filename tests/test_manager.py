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


def write_tiny_sdxl(path: Path) -> Path:
    """A tiny SDXL single file (UNet with pooled-text/time-id input, VAE, CLIP-L and bigG under SDXL's prefixes)."""
    from safetensors.torch import save_file
    from tiny_files import VAE
    from vidsynth.models.text import CLIPTextModel, OpenCLIPTextModel, TextEncoderConfig
    from vidsynth.models.unet import UNetConfig, UNetModel
    from vidsynth.models.vae import AutoencoderKL

    clip = TextEncoderConfig(49408, width=64, layers=2, heads=1, max_positions=77, activation="quick_gelu",
                             projection_dim=None, layout="hf")
    big_g = TextEncoderConfig(49408, width=64, layers=2, heads=1, max_positions=77, activation="gelu",
                              projection_dim=32, layout="open_clip")
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                      transformer_depth=(0, 1), transformer_depth_middle=1, context_dim=128, num_head_channels=64,
                      use_linear_in_transformer=True, adm_in_channels=32 + 6 * 256)
    torch.manual_seed(0)
    parts = {"model.diffusion_model.": UNetModel(unet), "first_stage_model.": AutoencoderKL(VAE),
             "conditioner.embedders.0.transformer.": CLIPTextModel(clip),
             "conditioner.embedders.1.model.": OpenCLIPTextModel(big_g)}
    save_file({prefix + k: v.half().contiguous() if v.is_floating_point() else v
               for prefix, module in parts.items() for k, v in module.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("dtype,vae_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float32)])
def test_sdxl_vae_is_kept_in_float32_when_the_rest_is_float16(tmp_path, dtype, vae_dtype):
    """The SDXL VAE overflows in float16 (black / NaN frames): a float16 manager holds it in float32; bfloat16 has
    float32's range and stays. An SD 1.5 VAE follows the manager's dtype."""
    from tiny_files import write_tiny_files

    manager = ModelManager(torch_dtype=dtype, device="cpu")
    info = manager.load_model(write_tiny_sdxl(tmp_path / "tiny_sdxl.safetensors"))
    assert info.family == "sdxl"
    assert next(manager.vae.parameters()).dtype == vae_dtype
    assert {next(manager.models[n].parameters()).dtype for n in ("unet", "text_encoder", "text_encoder_2")} == {dtype}
    sd15 = ModelManager(torch_dtype=dtype, device="cpu", file_path_list=[write_tiny_files(tmp_path / "sd15")["base"]])
    assert next(sd15.vae.parameters()).dtype == dtype


def test_load_lora_merge_folds_it_into_the_weights_and_alpha_and_removal_still_apply(tmp_path):
    from tiny_files import write_lora_files, write_tiny_files

    tiny = write_tiny_files(tmp_path / "tiny")
    adapter = write_lora_files(tmp_path / "loras")["v3_sd15_adapter.ckpt"]
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[tiny["base"], tiny["motion"]])
    to_q = manager.unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")  # the adapter's layer
    before = to_q.weight.detach().clone()
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0]), torch.randn(2, 7, 64)
    scale = lambda a: a.abs().max()  # noqa: E731
    with torch.no_grad():
        base = manager.unet(x, t, context)
        runtime = manager.load_lora(adapter, lora_alpha=0.7)
        want = manager.unet(x, t, context)
        manager.remove_lora(runtime)
        assert torch.equal(manager.unet(x, t, context), base) and (want - base).abs().max() > 1e-3 * scale(base)
        merged = manager.load_lora(adapter, lora_alpha=0.7, merge=True)
        assert (to_q.weight - before).abs().max() > 1e-3  # folded into the weight itself
        assert (manager.unet(x, t, context) - want).abs().max() <= 1e-5 * scale(want)  # == the run-time result
        manager.set_lora_alpha(merged, 0.0)
        torch.testing.assert_close(to_q.weight, before, rtol=0, atol=1e-6)
        assert (manager.unet(x, t, context) - base).abs().max() <= 1e-5 * scale(base)
        manager.set_lora_alpha(merged, 0.7)
        assert (manager.unet(x, t, context) - want).abs().max() <= 1e-5 * scale(want)
        manager.remove_lora(merged)
        torch.testing.assert_close(to_q.weight, before, rtol=0, atol=1e-6)
        assert manager.loras == []
