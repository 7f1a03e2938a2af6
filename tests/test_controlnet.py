"""ControlNet: parity with diffusers' ControlNetModel (SD 1.5, cldm layout through diffusers' own converter) and
ControlNetUnionModel (SDXL union), the UNet's control residual input against diffusers' UNet2DConditionModel, and
the full-size random files of the real layouts loading strictly."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tiny_models import SD15_UNET, SDXL_TIME_ID_DIM, SDXL_UNET, diffusers_unet2d, randomise, tiny_unet
from vidsynth.checkpoints import load_checkpoint
from vidsynth.errors import ConfigError
from vidsynth.models.layers import timestep_embedding
from vidsynth.models.controlnet import CLDM_PREFIX, ControlNet, ControlNetConfig, DiffusersControlNet

pytestmark = pytest.mark.usefixtures("one_thread")

HINT = (3, 8, 8, 16, 16, 24, 24, 32, 32)  # cldm's 3, 16, 16, 32, 32, 96, 96, 256, 320 scaled down; 8 convs, x8 down
SD15_CONTROLNET = ControlNetConfig(replace(SD15_UNET, out_channels=4), HINT)
SDXL_UNION = ControlNetConfig(SDXL_UNET, HINT, "diffusers", num_control_types=8, control_type_dim=SDXL_TIME_ID_DIM)


def diffusers_kwargs(c, hint):
    attention = [d > 0 for d in c.transformer_depth]
    kwargs = dict(
        in_channels=c.in_channels, layers_per_block=c.num_res_blocks,
        block_out_channels=[c.model_channels * m for m in c.channel_mult],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        transformer_layers_per_block=[max(d, 1) for d in c.transformer_depth], cross_attention_dim=c.context_dim,
        attention_head_dim=[c.heads(c.model_channels * m)[0] for m in c.channel_mult],
        use_linear_projection=c.use_linear_in_transformer, conditioning_embedding_out_channels=hint[1:-1:2],
    )
    if c.adm_in_channels:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_ID_DIM,
                      projection_class_embeddings_input_dim=c.adm_in_channels)
    return kwargs


def sd15_pair(seed: int = 0):
    """Ours in the cldm layout and diffusers' ControlNetModel holding the same weights via its converter."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    ours = randomise(lambda: ControlNet(SD15_CONTROLNET), seed)
    with torch.no_grad():  # cldm initialises zero convs at 0; random here so every residual carries a signal
        for p in (*ours.zero_convs.parameters(), *ours.middle_block_out.parameters(),
                  *ours.input_hint_block[-1:].parameters()):
            p.normal_(0, 0.2)
    file = {CLDM_PREFIX + k: v for k, v in ours.state_dict().items()}
    twin = ControlNetModel(**diffusers_kwargs(SD15_CONTROLNET.unet, HINT))
    twin.load_state_dict(convert_controlnet_checkpoint(file, {"layers_per_block": SD15_UNET.num_res_blocks}),
                         strict=True)
    return ours, twin.eval(), file


def inputs(config, batch: int = 2, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    hint = torch.rand(batch, 3, 64, 64, generator=g)
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    y = torch.randn(batch, config.adm_in_channels, generator=g) if config.adm_in_channels else None
    return x, hint, torch.tensor([999.0, 421.5])[:batch], context, y


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest difference relative to the largest value, over all residuals."""
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(a, b))


def test_sd15_cldm_matches_diffusers_controlnet():
    """cldm file -> ours vs the same file through diffusers' convert_controlnet_checkpoint -> ControlNetModel:
    13 residuals (12 down, 1 mid), worst relative difference measured 0 (float32, CPU: the same ops in the same
    order)."""
    ours, twin, file = sd15_pair()
    config = ControlNetConfig.from_state_dict({k[len(CLDM_PREFIX):]: v.shape for k, v in file.items()})
    assert config == SD15_CONTROLNET
    x, hint, t, context, _ = inputs(SD15_UNET)
    with torch.no_grad():
        down, mid = ours(x, hint, t, context)
        ref = twin(x, t, context, hint, return_dict=False)
    assert len(down) == len(ref[0]) == 12
    assert worst(down + [mid], list(ref[0]) + [ref[1]]) < 1e-5


def test_unet_control_residuals_match_diffusers():
    """UNet(control=(down, mid)) vs UNet2DConditionModel(down_block_additional_residuals=...,
    mid_block_additional_residual=...): measured 0 relative; the residuals change the output by 1.1x its scale."""
    unet = tiny_unet(SD15_UNET)
    twin = diffusers_unet2d(unet)
    ours_cn, twin_cn, _ = sd15_pair()
    x, hint, t, context, _ = inputs(SD15_UNET)
    with torch.no_grad():
        down, mid = ours_cn(x, hint, t, context)
        out = unet(x, t, context, control=(down, mid))
        plain = unet(x, t, context)
        ref = twin(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert ((out - plain).abs().max() / ref.abs().max()).item() > 1e-2


def union_pair(seed: int = 0):
    from diffusers import ControlNetUnionModel

    mc = SDXL_UNET.model_channels
    twin = randomise(lambda: ControlNetUnionModel(**diffusers_kwargs(SDXL_UNET, HINT), num_control_type=8,
                                                  num_trans_channel=mc, num_proj_channel=mc), seed)
    with torch.no_grad():  # zero-initialised there; random here so they matter
        for p in (*twin.controlnet_down_blocks.parameters(), *twin.controlnet_mid_block.parameters(),
                  *twin.spatial_ch_projs.parameters(), *twin.controlnet_cond_embedding.conv_out.parameters()):
            p.normal_(0, 0.2)
    ours = DiffusersControlNet(SDXL_UNION).eval()
    ours.load_state_dict(twin.state_dict(), strict=True)
    return ours, twin.eval()


@pytest.mark.parametrize("control_type", [3, 6])
def test_sdxl_union_matches_diffusers(control_type):
    """Ours vs ControlNetUnionModel (one condition, control_type_idx=[k], one-hot control_type): measured 7e-7
    relative over the 10 residuals (9 down, 1 mid); the config read off the twin's keys is the one it was built from."""
    ours, twin = union_pair()
    shapes = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    # head width is invisible in shapes: read as SDXL's 64
    read = ControlNetConfig.from_state_dict(shapes)
    assert read == replace(SDXL_UNION, unet=replace(SDXL_UNET, num_head_channels=64))
    x, hint, t, context, _ = inputs(SDXL_UNET)
    onehot = torch.zeros(2, 8)
    onehot[:, control_type] = 1
    # diffusers takes pooled text + raw time ids, ours the embedded y (as the UNet): the same y for both
    pooled, time_ids = torch.randn(2, 16), torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 8, 4, 64, 64]])
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), SDXL_TIME_ID_DIM).reshape(2, -1)], 1)
    with torch.no_grad():
        down, mid = ours(x, hint, t, context, y, control_type=control_type)
        ref = twin(x, t, context, [hint], onehot, [control_type], 1.0,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)
    assert len(down) == len(ref[0]) == 9
    assert worst(down + [mid], list(ref[0]) + [ref[1]]) < 1e-5


def test_sdxl_diffusers_controlnet_matches_diffusers():
    """A plain (non-union) SDXL ControlNet in the diffusers layout vs ControlNetModel with the same weights:
    measured 0 relative over the 10 residuals (float32, CPU)."""
    from diffusers import ControlNetModel

    twin = randomise(lambda: ControlNetModel(**diffusers_kwargs(SDXL_UNET, HINT)), seed=3)
    with torch.no_grad():
        for p in (*twin.controlnet_down_blocks.parameters(), *twin.controlnet_mid_block.parameters(),
                  *twin.controlnet_cond_embedding.conv_out.parameters()):
            p.normal_(0, 0.2)
    ours = DiffusersControlNet(ControlNetConfig(SDXL_UNET, HINT, "diffusers")).eval()
    ours.load_state_dict(twin.state_dict(), strict=True)
    x, hint, t, context, _ = inputs(SDXL_UNET)
    pooled, time_ids = torch.randn(2, 16), torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 8, 4, 64, 64]])
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), SDXL_TIME_ID_DIM).reshape(2, -1)], 1)
    with torch.no_grad():
        down, mid = ours(x, hint, t, context, y)
        ref = twin(x, t, context, hint, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                   return_dict=False)
    assert worst(down + [mid], list(ref[0]) + [ref[1]]) < 1e-5


def test_union_needs_a_control_type():
    ours, _ = union_pair()
    x, hint, t, context, y = inputs(SDXL_UNET)
    with pytest.raises(ConfigError, match="control_type"):
        ours(x, hint, t, context, y)
    with pytest.raises(ConfigError, match="outside"):
        ours(x, hint, t, context, y, control_type=8)


def test_model_manager_loads_controlnets_and_refuses_the_other_family(tmp_path):
    """A cldm .pth (pickled, keys under control_model.) loads next to an SD 1.5 UNet and gives the same residuals
    as the module it was saved from; an SD 1.5 ControlNet next to an SDXL UNet is refused, naming the file."""
    from safetensors.torch import save_file

    from vidsynth import ModelManager
    from vidsynth.models.unet import PREFIX

    ours, _, file = sd15_pair()
    torch.save(file, tmp_path / "control_tiny_sd15.pth")
    save_file({PREFIX + k: v for k, v in tiny_unet(SD15_UNET).state_dict().items()}, tmp_path / "sd15.safetensors")
    save_file({PREFIX + k: v for k, v in tiny_unet(SDXL_UNET).state_dict().items()}, tmp_path / "sdxl.safetensors")

    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([tmp_path / "sd15.safetensors", tmp_path / "control_tiny_sd15.pth"])
    loaded = manager.fetch_controlnet(tmp_path / "control_tiny_sd15.pth")
    assert manager.unet is not None and isinstance(loaded, ControlNet) and loaded.family == "sd15"
    x, hint, t, context, _ = inputs(SD15_UNET)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x, hint, t, context)[0], ours(x, hint, t, context)[0]))

    xl = ModelManager(torch_dtype=torch.float32, device="cpu")
    xl.load_models([tmp_path / "sdxl.safetensors"])
    with pytest.raises(ConfigError, match=r"control_tiny_sd15\.pth.*sd15 ControlNet.*sdxl"):
        xl.load_models([tmp_path / "control_tiny_sd15.pth"])
    with pytest.raises(ConfigError, match="not a ControlNet"):
        xl.fetch_controlnet(tmp_path / "sd15.safetensors")


def _load_strict(path, expected_family, expected_tensors):
    """Through ModelManager.load_models (strict load on the key sets, then the tensors), float16 to halve RAM."""
    from vidsynth import ModelManager

    _, info = load_checkpoint(path)
    assert info.kind == "controlnet" and info.family == expected_family and info.num_tensors == expected_tensors
    manager = ModelManager(torch_dtype=torch.float16, device="cpu")
    manager.load_models([path])
    model = manager.fetch_controlnet(path)
    assert sum(1 for _ in model.state_dict()) == expected_tensors
    assert all(p.dtype == torch.float16 and p.device.type == "cpu" for p in model.parameters())
    return info.components[0].config


@pytest.mark.parametrize("name", ["control_v11p_sd15_lineart.pth", "control_v11f1e_sd15_tile.pth"])
def test_full_size_sd15_controlnets_load_strictly(name, full_checkpoint, shared_dir):
    """Full-size random files from the layouts (340 tensors): identified as sd15 ControlNets, config = SD 1.5's."""
    manifest = json.loads((shared_dir / "checkpoint-layouts" / f"{name}.json").read_text())
    config = _load_strict(full_checkpoint(name), "sd15", manifest["num_tensors"])
    assert config.unet.model_channels == 320 and config.unet.channel_mult == (1, 2, 4, 4)
    assert config.hint_channels == (3, 16, 16, 32, 32, 96, 96, 256, 320)


def test_full_size_sdxl_union_loads_strictly(full_checkpoint, shared_dir):
    """diffusion_pytorch_model_promax.safetensors (863 tensors): sdxl, union with 8 control types."""
    name = "diffusion_pytorch_model_promax.safetensors"
    manifest = json.loads((shared_dir / "checkpoint-layouts" / f"{name}.json").read_text())
    config = _load_strict(full_checkpoint(name), "sdxl", manifest["num_tensors"])
    assert config.num_control_types == 8 and config.control_type_dim == 256
    assert config.unet.transformer_depth == (0, 2, 10) and config.unet.adm_in_channels == 2816
