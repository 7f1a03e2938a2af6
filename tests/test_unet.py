"""UNet: parity with diffusers, motion-module sites, frame-pooled GroupNorm, config read off real layouts."""
from __future__ import annotations

import json

import pytest
import torch

from vidsynth.errors import CheckpointError, ConfigError
from vidsynth.models.layers import timestep_embedding
from vidsynth.models.unet import PREFIX, UNetConfig, UNetModel

TINY_SD15 = UNetConfig(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
    transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, context_dim=48, num_heads=8,
)
TIME_ID_DIM, POOLED_DIM = 8, 16  # SDXL: 256 and 1280
TINY_SDXL = UNetConfig(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
    transformer_depth=(0, 2, 2), transformer_depth_middle=2, context_dim=64, num_head_channels=16,
    use_linear_in_transformer=True, adm_in_channels=POOLED_DIM + 6 * TIME_ID_DIM,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_unet(config: UNetConfig, seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    model = UNetModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm weights and biases away from their 1 / 0 defaults, so that they matter
                p.add_(torch.randn_like(p) * 0.2)
    return model


def diffusers_twin(model: UNetModel):
    """diffusers' UNet2DConditionModel with our weights, through diffusers' own single-file converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    c = model.config
    attention = [d > 0 for d in c.transformer_depth]
    heads = [c.heads(c.model_channels * m)[0] for m in c.channel_mult]
    kwargs = dict(
        in_channels=c.in_channels, out_channels=c.out_channels, layers_per_block=c.num_res_blocks,
        block_out_channels=[c.model_channels * m for m in c.channel_mult],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        transformer_layers_per_block=[max(d, 1) for d in c.transformer_depth],
        cross_attention_dim=c.context_dim, attention_head_dim=heads, use_linear_projection=c.use_linear_in_transformer,
    )
    assert c.transformer_depth_middle == c.transformer_depth[-1] or not c.transformer_depth[-1]
    ldm_config = {"layers_per_block": c.num_res_blocks}
    if c.adm_in_channels:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_DIM,
                      projection_class_embeddings_input_dim=c.adm_in_channels)
        ldm_config["addition_embed_type"] = "text_time"
    twin = UNet2DConditionModel(**kwargs).eval()
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in model.state_dict().items()}, ldm_config)
    twin.load_state_dict(converted, strict=True)
    return twin


@pytest.mark.parametrize("config, size", [(TINY_SD15, (16, 16)), (TINY_SDXL, (12, 18))], ids=["sd15", "sdxl"])
def test_parity_with_diffusers(config: UNetConfig, size: tuple[int, int]):
    model = random_unet(config)
    twin = diffusers_twin(model)
    torch.manual_seed(1)
    x = torch.randn(2, 4, *size)
    t = torch.tensor([999.0, 3.0])
    context = torch.randn(2, 7, config.context_dim)
    kwargs, y = {}, None
    if config.adm_in_channels:  # y = pooled text + Fourier-embedded time ids, as diffusers builds it
        pooled, time_ids = torch.randn(2, POOLED_DIM), torch.tensor([[64.0, 48, 0, 8, 64, 48], [32, 32, 4, 0, 32, 32]])
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), TIME_ID_DIM).reshape(2, -1)], dim=1)
    with torch.no_grad():
        ours = model(x, t, context, y)
        theirs = twin(x, t, context, **kwargs).sample
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    print(f"tiny {'sdxl' if config.adm_in_channels else 'sd15'}: max abs err {err:.2e}, output scale {scale:.2e}")
    assert ours.shape == x.shape
    assert err <= 1e-5 * max(scale, 1.0)


class RecordingMotion:
    """A fake motion-module set: records every site call and shifts h, so the output proves the result is used."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.calls = enabled, []

    def site(self, name: str):
        if not self.enabled:
            return None

        def hook(h: torch.Tensor, num_frames: int) -> torch.Tensor:
            self.calls.append((name, h.shape[1], tuple(h.shape[-2:]), num_frames))
            return h + 0.5

        return hook


@pytest.mark.parametrize("config", [TINY_SD15, TINY_SDXL], ids=["sd15", "sdxl"])
def test_motion_sites_order_channels_and_placement(config: UNetConfig):
    model = random_unet(config)
    levels, frames, side = len(config.channel_mult), 3, 8
    x = torch.randn(frames, 4, side, side)
    context = torch.randn(frames, 5, config.context_dim)
    y = torch.randn(frames, config.adm_in_channels) if config.adm_in_channels else None
    motion = RecordingMotion()
    with torch.no_grad():
        plain = model(x, torch.tensor(10.0), context, y, num_frames=frames)
        hooked = model(x, torch.tensor(10.0), context, y, num_frames=frames, motion=motion)
        unhooked = model(x, torch.tensor(10.0), context, y, num_frames=frames, motion=RecordingMotion(enabled=False))

    sites = model.motion_sites()
    assert len(sites) == levels * config.num_res_blocks + 1 + levels * (config.num_res_blocks + 1)
    assert [c[0] for c in motion.calls] == list(sites)
    assert {c[0]: c[1] for c in motion.calls} == sites
    assert all(c[3] == frames for c in motion.calls)
    for name, _, hw, _ in motion.calls:  # up block i runs at the resolution of level L-1-i: before its upsampler
        kind, index = name.split(".")[:2]
        level = int(index) if kind == "down_blocks" else levels - 1 - int(index) if kind == "up_blocks" else levels - 1
        assert hw == (side >> level, side >> level), name
    assert torch.equal(unhooked, plain)
    assert (hooked - plain).abs().max() > 1e-2


def test_pooled_resnet_norms():
    model = random_unet(TINY_SD15)
    frames = 3
    torch.manual_seed(2)
    x = torch.randn(2 * frames, 4, 8, 8)
    context = torch.randn(2 * frames, 5, TINY_SD15.context_dim)
    t = torch.tensor(500.0)
    with torch.no_grad():
        pooled = model(x, t, context, num_frames=frames, pool_resnet_norms=True)
        per_frame = model(x, t, context, num_frames=frames)
        single = model(x, t, context, num_frames=1, pool_resnet_norms=True)
        plain = model(x, t, context)
        # statistics pool within a clip only: changing clip 1 leaves clip 0 alone
        x2 = x.clone()
        x2[frames:] = torch.randn(frames, 4, 8, 8)
        pooled2 = model(x2, t, context, num_frames=frames, pool_resnet_norms=True)
        # identical frames: pooled statistics equal each frame's own (float64: no rounding noise to allow for)
        same, same_ctx = (v[::frames].repeat_interleave(frames, 0).double() for v in (x, context))
        model.double()
        same_pooled = model(same, t, same_ctx, num_frames=frames, pool_resnet_norms=True)
        same_per_frame = model(same, t, same_ctx, num_frames=frames)
    assert (pooled - per_frame).abs().max() > 1e-2
    assert torch.equal(single, plain)
    assert torch.allclose(pooled2[:frames], pooled[:frames], atol=1e-6)
    assert not torch.allclose(pooled2[frames:], pooled[frames:], atol=1e-2)
    assert torch.allclose(same_pooled, same_per_frame, atol=1e-9)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_unet(TINY_SD15).train()
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 5, TINY_SD15.context_dim)
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(x, torch.tensor([1.0, 900.0]), context, motion=RecordingMotion()).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def manifest_unet(shared_dir, name: str) -> dict[str, tuple[int, ...]]:
    tensors = json.loads((shared_dir / "checkpoint-layouts" / f"{name}.json").read_text())["tensors"]
    return {k[len(PREFIX):]: tuple(v) for k, v in tensors.items() if k.startswith(PREFIX)}


def manifest_motion_sites(shared_dir, name: str) -> dict[str, int]:
    tensors = json.loads((shared_dir / "checkpoint-layouts" / f"{name}.json").read_text())["tensors"]
    suffix = ".temporal_transformer.norm.weight"
    return {k[: -len(suffix)]: v[0] for k, v in tensors.items() if k.endswith(suffix)}


@pytest.mark.parametrize(
    "name, expected, motion_modules",
    [
        ("v1-5-pruned-emaonly.safetensors",
         dict(model_channels=320, channel_mult=(1, 2, 4, 4), transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
              context_dim=768, num_heads=8, use_linear_in_transformer=False, adm_in_channels=None, family="sd15"),
         ["mm_sd_v15_v2.ckpt", "mm_sd_v15.ckpt", "v3_sd15_mm.ckpt"]),
        ("sd_xl_base_1.0.safetensors",
         dict(model_channels=320, channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
              context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
              family="sdxl"),
         ["mm_sdxl_v10_beta.ckpt"]),
    ],
    ids=["sd15", "sdxl"],
)
def test_config_from_real_layouts(shared_dir, name, expected, motion_modules):
    shapes = manifest_unet(shared_dir, name)
    config = UNetConfig.from_state_dict(shapes)
    assert {k: getattr(config, k) for k in expected} == expected
    assert (config.in_channels, config.out_channels, config.num_res_blocks) == (4, 4, 2)
    with torch.device("meta"):
        model = UNetModel(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    sites = model.motion_sites()
    for mm in motion_modules:  # every released module's site exists here, with its channel count
        mm_sites = manifest_motion_sites(shared_dir, mm)
        assert mm_sites and {k: sites.get(k) for k in mm_sites} == mm_sites


def test_bad_inputs_raise_our_errors(shared_dir):
    shapes = manifest_unet(shared_dir, "v1-5-pruned-emaonly.safetensors")
    with pytest.raises(CheckpointError, match="strip"):
        UNetConfig.from_state_dict({PREFIX + k: v for k, v in shapes.items()})
    with pytest.raises(CheckpointError, match="not an SD/SDXL UNet"):
        UNetConfig.from_state_dict({"encoder.conv_in.weight": (128, 3, 3, 3)})
    model = UNetModel(TINY_SDXL)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 3, TINY_SDXL.context_dim)
    with pytest.raises(ConfigError, match="needs y"):
        model(x, torch.tensor(1.0), context)
    with pytest.raises(ConfigError, match="clips"):
        model(x, torch.tensor(1.0), context, torch.randn(2, TINY_SDXL.adm_in_channels), num_frames=3)
