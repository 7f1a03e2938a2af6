"""Motion modules: parity with diffusers' AnimateDiff blocks, version detection and strict loading of every real layout."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tiny_models import PerFrameGroupNorm
from vidsynth.errors import CheckpointError, ConfigError
from vidsynth.models.motion import (DEFAULT_SAMPLING, MOTION_VERSIONS, MotionConfig, MotionModuleSet,
                                    sampling_defaults, sinusoid_table)

TINY_SITES = {
    **{f"down_blocks.{i}.motion_modules.{j}": c for i, c in enumerate((32, 64)) for j in range(2)},
    "mid_block.motion_modules.0": 64,
    **{f"up_blocks.{i}.motion_modules.{j}": c for i, c in enumerate((64, 32)) for j in range(3)},
}
TOLERANCE = 1e-4  # max abs error relative to the output's largest magnitude, fp32


def tiny_set(version: str, pe_length: int = 8) -> MotionModuleSet:
    torch.manual_seed(0)
    motion = MotionModuleSet(MotionConfig(version, "tiny test config", TINY_SITES, pe_length)).eval()
    with torch.no_grad():
        for name, tensor in motion.state_dict().items():
            if name.endswith("attention_blocks.1.pos_encoder.pe"):
                continue  # diffusers keeps one table per block: share block 0's random table
            is_scale = tensor.ndim == 1 and ("norm" in name) and name.endswith("weight")
            tensor.copy_(1 + 0.2 * torch.randn_like(tensor) if is_scale else 0.3 * torch.randn_like(tensor))
        for name, tensor in motion.state_dict().items():
            if name.endswith("attention_blocks.1.pos_encoder.pe"):
                tensor.copy_(motion.state_dict()[name.replace("attention_blocks.1", "attention_blocks.0")])
    return motion


def diffusers_twin(motion: MotionModuleSet, per_frame: bool):
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    ours = motion.state_dict()
    theirs = convert_animatediff_checkpoint_to_diffusers(ours)  # drops pos_encoder tables
    for name, table in ours.items():
        if name.endswith("attention_blocks.0.pos_encoder.pe"):
            site = name.split(".temporal_transformer.")[0]
            theirs[f"{site}.transformer_blocks.0.pos_embed.pe"] = table
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, motion_max_seq_length=motion.config.pe_length,
                            use_motion_mid_block=True).eval()
    adapter.load_state_dict(theirs, strict=True)
    if per_frame:
        for module in adapter.modules():
            if hasattr(module, "proj_in") and isinstance(getattr(module, "norm", None), nn.GroupNorm):
                module.norm = PerFrameGroupNorm(module.norm)
    return adapter


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("version,per_frame", [("v2", True), ("sdxl_beta", False)])
def test_parity_with_diffusers(version, per_frame):
    motion = tiny_set(version)
    assert motion.config.pool_motion_norm is not per_frame
    adapter = diffusers_twin(motion, per_frame)
    frames = 6  # fewer than pe_length: the table is sliced
    torch.manual_seed(1)
    with torch.no_grad():
        for name, channels in motion.sites().items():
            h = torch.randn(2 * frames, channels, 4, 3) * 2 + 0.5
            ours = motion.site(name)(h, frames)
            theirs = adapter.get_submodule(name)(h, num_frames=frames)
            assert max_rel_error(ours, theirs) < TOLERANCE, name
            assert max_rel_error(ours, h) > 0.05  # the module does something


def test_norm_pooling_matters():
    motion, pooled = tiny_set("v2"), tiny_set("sdxl_beta")
    h = torch.randn(2 * 4, 32, 4, 4) * torch.linspace(0.2, 3, 8)[:, None, None, None]  # frames differ in scale
    with torch.no_grad():
        site = "down_blocks.0.motion_modules.0"
        assert max_rel_error(motion.site(site)(h, 4), pooled.site(site)(h, 4)) > 1e-2


def test_scale_blends_with_input():
    motion = tiny_set("v3")
    h = torch.randn(3 * 5, 64, 2, 2)
    site = motion.site("up_blocks.0.motion_modules.2")
    with torch.no_grad():
        full = site(h, 5)
        motion.scale = 0.0
        assert torch.equal(site(h, 5), h)
        motion.scale = 0.5
        torch.testing.assert_close(site(h, 5), h + 0.5 * (full - h), rtol=1e-5, atol=1e-5)
    assert motion.site("mid_block.motion_modules.1") is None


def test_new_is_identity_and_frame_limit():
    config = MotionConfig("v2", "fresh", TINY_SITES, 8)
    motion = MotionModuleSet.new(config)
    table = motion.down_blocks[0].motion_modules[0].temporal_transformer.transformer_blocks[0] \
        .attention_blocks[1].pos_encoder.pe
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding  # diffusers' own table, not ours again

    torch.testing.assert_close(table, SinusoidalPositionalEmbedding(32, 8).pe, rtol=0, atol=1e-6)
    assert table[0, 3, 0] == pytest.approx(torch.sin(torch.tensor(3.0)).item())
    assert table[0, 3, 1] == pytest.approx(torch.cos(torch.tensor(3.0)).item())
    h = torch.randn(2 * 8, 64, 3, 3)
    assert torch.equal(motion.site("mid_block.motion_modules.0")(h, 8), h)
    with pytest.raises(ConfigError, match="context windows"):
        motion.site("mid_block.motion_modules.0")(torch.randn(9, 64, 2, 2), 9)


def test_gradient_checkpointing_gives_same_grads():
    motion = tiny_set("v2").train()
    h = torch.randn(2 * 4, 32, 2, 2, requires_grad=True)
    site = motion.site("down_blocks.0.motion_modules.1")
    site(h, 4).square().sum().backward()
    plain = h.grad.clone()
    h.grad = None
    motion.gradient_checkpointing = True
    site(h, 4).square().sum().backward()
    torch.testing.assert_close(h.grad, plain)


def manifest_shapes(shared_dir, name: str) -> dict[str, list[int]]:
    return json.loads((shared_dir / "checkpoint-layouts" / f"{name}.json").read_text())["tensors"]


EXPECTED = {  # manifest -> (version, sites, pe length, down channels per level, has mid)
    "mm_sd_v14.ckpt": ("v1", 20, 24, (320, 640, 1280, 1280), False),
    "mm_sd_v15.ckpt": ("v1", 20, 24, (320, 640, 1280, 1280), False),
    "mm_sd_v15_v2.ckpt": ("v2", 21, 32, (320, 640, 1280, 1280), True),
    "v3_sd15_mm.ckpt": ("v3", 20, 32, (320, 640, 1280, 1280), False),
    "mm_sdxl_v10_beta.ckpt": ("sdxl_beta", 15, 32, (320, 640, 1280), False),
    "AnimateLCM_sd15_t2v.ckpt": ("animatelcm", 21, 32, (320, 640, 1280, 1280), True),
    "animatediff_lightning_4step_comfyui.safetensors": ("lightning", 21, 32, (320, 640, 1280, 1280), True),
}


def check_config(config: MotionConfig, name: str):
    version, count, pe_length, down, has_mid = EXPECTED[name]
    assert (config.version, len(config.sites), config.pe_length) == (version, count, pe_length), config.version_reason
    assert tuple(config.sites[f"down_blocks.{i}.motion_modules.1"] for i in range(len(down))) == down
    assert tuple(config.sites[f"up_blocks.{i}.motion_modules.2"] for i in range(len(down))) == down[::-1]
    assert ("mid_block.motion_modules.0" in config.sites) is has_mid
    assert list(config.sites)[0] == "down_blocks.0.motion_modules.0"
    assert list(config.sites)[-1] == f"up_blocks.{len(down) - 1}.motion_modules.2"
    assert config.base_family == ("sdxl" if len(down) == 3 else "sd15")
    assert config.pool_resnet_norms is (version == "v1")
    assert config.pool_motion_norm is (version == "sdxl_beta")


def load_strictly(state: dict, name: str) -> MotionModuleSet:
    config = MotionConfig.from_state_dict({k: v.shape for k, v in state.items()}, filename=name)
    check_config(config, name)
    with torch.device("meta"):
        motion = MotionModuleSet(config)
    motion.load_state_dict(state, strict=True, assign=True)
    return motion


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_layout_reads_and_loads_strictly(shared_dir, name):
    """Keys and shapes of each real file, as meta tensors: right config, strict load (no data, so it is quick)."""
    state = {k: torch.empty(shape, device="meta") for k, shape in manifest_shapes(shared_dir, name).items()}
    assert set(load_strictly(state, name).state_dict()) == set(state)


# Full-size random files (0.5-0.9 GB each in fp16; writing one takes 10-30 s on the shared box): one per file format
# and family. The other five layouts differ from these only in keys and shapes, which the meta test above covers.
@pytest.mark.parametrize("name", ["mm_sdxl_v10_beta.ckpt", "animatediff_lightning_4step_comfyui.safetensors"])
def test_full_size_file_loads_strictly(full_checkpoint, name):
    path = full_checkpoint(name, dtype="float16")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    state.pop("animatediff_config", None)
    motion = load_strictly(state, name)
    key = "up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight"
    assert torch.equal(motion.get_submodule(key.rsplit(".", 1)[0]).weight, state[key])
    assert not any(t.is_meta for t in motion.state_dict().values())


def test_version_rules(shared_dir):
    v2 = manifest_shapes(shared_dir, "mm_sd_v15_v2.ckpt")
    assert MotionConfig.from_state_dict(v2).version == "v2"
    assert MotionConfig.from_state_dict(v2, filename="my_AnimateLCM_t2v.ckpt").version == "animatelcm"
    assert MotionConfig.from_state_dict(v2, filename="x_Lightning_8step.safetensors").version == "lightning"
    explicit = MotionConfig.from_state_dict(v2, filename="mm_sd_v15_v2.ckpt", version="lightning")
    assert explicit.version == "lightning" and "explicit" in explicit.version_reason
    with pytest.raises(CheckpointError, match="without a mid module"):
        MotionConfig.from_state_dict(v2, version="v3")
    with pytest.raises(CheckpointError, match="SDXL"):
        MotionConfig.from_state_dict(manifest_shapes(shared_dir, "v3_sd15_mm.ckpt"), version="sdxl_beta")
    with pytest.raises(ConfigError, match="choose one of"):
        MotionConfig.from_state_dict(v2, version="v4")


def test_files_without_pe_tables(shared_dir):
    v1 = {k: v for k, v in manifest_shapes(shared_dir, "mm_sd_v14.ckpt").items() if not k.endswith("pos_encoder.pe")}
    config = MotionConfig.from_state_dict(v1, filename="mm_sd_v14.ckpt")
    assert (config.version, config.pe_length, config.pe_in_file) == ("v1", 24, False)
    assert "no pos_encoder.pe" in config.version_reason
    assert MotionConfig.from_state_dict(v1).version == "v3"  # ambiguous without a name: the reason says how to fix
    with torch.device("meta"):
        motion = MotionModuleSet(config)
    assert set(motion.state_dict()) == set(v1)
    motion.load_state_dict({k: torch.empty(shape, device="meta") for k, shape in v1.items()}, strict=True, assign=True)
    table = motion.up_blocks[3].motion_modules[2].temporal_transformer.transformer_blocks[0] \
        .attention_blocks[0].pos_encoder.pe
    # built on the device of the loaded parameters (meta here: real loads put both on the CPU or GPU)
    assert table.shape == sinusoid_table(24, 320).shape and table.device == next(motion.parameters()).device
    assert hash(config) == hash(MotionConfig.from_state_dict(v1, filename="/AnimateLCM/mm_sd_v14.ckpt"))


def test_unknown_layouts_are_named(shared_dir):
    v3 = manifest_shapes(shared_dir, "v3_sd15_mm.ckpt")
    truncated = {k: v for k, v in v3.items() if not k.startswith("down_blocks.3.")}
    with pytest.raises(CheckpointError, match="down 320x2/640x2/1280x2, mid none, up 1280x3"):
        MotionConfig.from_state_dict(truncated)
    with pytest.raises(CheckpointError, match="not an AnimateDiff motion module"):
        MotionConfig.from_state_dict(manifest_shapes(shared_dir, "v1-5-pruned-emaonly.safetensors"))
    with pytest.raises(CheckpointError, match="LoRA"):
        MotionConfig.from_state_dict(manifest_shapes(shared_dir, "v2_lora_ZoomIn.ckpt"))


def test_sampling_defaults():
    assert set(DEFAULT_SAMPLING) == set(MOTION_VERSIONS)
    assert DEFAULT_SAMPLING["v1"]["beta_schedule"] == "linear" and DEFAULT_SAMPLING["v2"]["sampler"] == "ddim"
    assert DEFAULT_SAMPLING["sdxl_beta"]["beta_end"] == 0.020
    assert sampling_defaults("lightning", "animatediff_lightning_8step_comfyui.safetensors")["steps"] == 8
    assert sampling_defaults("lightning")["timestep_spacing"] == "trailing"
    assert sampling_defaults("v3", "x_8step.ckpt")["steps"] == 25


def test_lightning_default_steps_come_from_the_file_name(shared_dir):
    import json

    layout = json.loads((shared_dir / "checkpoint-layouts" / "animatediff_lightning_4step_comfyui.safetensors.json")
                        .read_text())["tensors"]
    for steps in (1, 2, 8):
        config = MotionConfig.from_state_dict(layout, filename=f"/x/animatediff_lightning_{steps}step_comfyui.safetensors")
        assert config.version == "lightning" and config.sampling_defaults()["steps"] == steps
    assert MotionConfig.from_state_dict(layout, filename="mm.ckpt").sampling_defaults()["steps"] == 25


def test_tables_of_a_file_without_them_are_built_where_the_weights_are():
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding
    from tiny_models import tiny_motion, tiny_unet

    full = tiny_motion(tiny_unet(), "v1").state_dict()
    state = {k: v.clone() for k, v in full.items() if not k.endswith("pos_encoder.pe")}
    config = MotionConfig.from_state_dict({k: v.shape for k, v in state.items()}, filename="mm_sd_v15.ckpt")
    with torch.device("meta"):
        motion = MotionModuleSet(config)
    motion.load_state_dict(state, strict=True, assign=True)
    for key, value in motion.state_dict().items():
        if key.endswith("pos_encoder.pe"):
            assert value.device.type == "cpu"
            torch.testing.assert_close(value, SinusoidalPositionalEmbedding(value.shape[-1], 24).pe, rtol=0, atol=1e-6)
