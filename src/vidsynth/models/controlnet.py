"""ControlNet: a copy of the UNet's encoder that reads a control image (hint) and returns one residual per skip plus
one for the middle block, added by ``UNetModel.forward(..., control=(down, mid))``.

Two file layouts:
- the original cldm layout of the SD 1.5 ControlNets (``control_v11p_sd15_lineart.pth``; keys under
  ``control_model.``): ``time_embed``, ``input_blocks``, ``middle_block`` are the UNet's own names and are built by
  the UNet's code (:func:`vidsynth.models.unet.encoder`), plus ``input_hint_block``, ``zero_convs``,
  ``middle_block_out``;
- the diffusers layout of the SDXL ControlNets (``diffusion_pytorch_model.safetensors``), including the union model
  (``diffusion_pytorch_model_promax.safetensors``: control-type embedding, task embedding, a transformer over the
  condition features). Its resnets and downsamplers are named as diffusers names them, so they get small modules of
  their own here; its attention blocks have the LDM names already and are the UNet's ``SpatialTransformer``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vidsynth.errors import CheckpointError, ConfigError
from vidsynth.models.layers import timestep_embedding
from vidsynth.models.unet import UNetConfig, _transformer, embed, embeddings, encoder

CLDM_PREFIX = "control_model."
Residuals = tuple[list[torch.Tensor], torch.Tensor]

# xinsir's union model: the index of each control type in its 0/1 control-type vector
UNION_CONTROL_TYPES = {"openpose": 0, "depth": 1, "hed": 2, "pidi": 2, "scribble": 2, "ted": 2, "canny": 3,
                       "lineart": 3, "anime_lineart": 3, "mlsd": 3, "normal": 4, "segment": 5, "tile": 6,
                       "repaint": 7, "inpaint": 7}
UNION_HEADS = 8  # heads of the union model's condition transformer (invisible in shapes)


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig                  # the encoder's configuration, as the UNet it was trained with
    hint_channels: tuple[int, ...]    # channels of the hint convolutions: 3 (RGB), 16, 16, 32, ..., model_channels
    layout: str = "cldm"              # "cldm" (original SD 1.5 files) or "diffusers"
    num_control_types: int = 0        # union model: entries of the control-type vector (0: not a union model)
    control_type_dim: int = 0         # union model: width of each entry's sinusoidal embedding (256)

    @property
    def family(self) -> str:
        return self.unet.family

    @property
    def union(self) -> bool:
        return self.num_control_types > 0

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]]) -> ControlNetConfig:
        """Read the configuration off the key names and shapes (cldm keys without ``control_model.``, or diffusers
        keys)."""
        if "input_hint_block.0.weight" in shapes:
            hint = [shapes[f"input_hint_block.{i}.weight"] for i in range(0, 64, 2)
                    if f"input_hint_block.{i}.weight" in shapes]
            return cls(UNetConfig.from_state_dict(shapes, encoder_only=True), _hint_channels(hint))
        if "controlnet_cond_embedding.conv_in.weight" in shapes:
            return _diffusers_config(shapes)
        raise CheckpointError("not a ControlNet state dict: neither cldm's input_hint_block nor diffusers' "
                              "controlnet_cond_embedding")


def _hint_channels(convs: Sequence[Sequence[int]]) -> tuple[int, ...]:
    return (convs[0][1], *(shape[0] for shape in convs))


def _diffusers_config(shapes: Mapping[str, Sequence[int]]) -> ControlNetConfig:
    def count(pattern: str) -> int:
        found = {int(m[1]) for k in shapes if (m := re.match(pattern, k))}
        return max(found) + 1 if found else 0

    levels = count(r"down_blocks\.(\d+)\.")
    channels = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]
    mc = shapes["conv_in.weight"][0]
    depth = tuple(count(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in range(levels))
    attn2 = next(k for k in shapes if k.endswith("attn2.to_k.weight"))
    adm = shapes["add_embedding.linear_1.weight"][1] if "add_embedding.linear_1.weight" in shapes else None
    hint = [shapes["controlnet_cond_embedding.conv_in.weight"]]
    hint += [shapes[f"controlnet_cond_embedding.blocks.{i}.weight"]
             for i in range(count(r"controlnet_cond_embedding\.blocks\.(\d+)\."))]
    hint += [shapes["controlnet_cond_embedding.conv_out.weight"]]
    if any(c % mc for c in channels):
        raise CheckpointError(f"ControlNet level channels {channels} are not multiples of conv_in's {mc}")
    unet = UNetConfig(
        in_channels=shapes["conv_in.weight"][1], out_channels=shapes["conv_in.weight"][1], model_channels=mc,
        channel_mult=tuple(c // mc for c in channels), num_res_blocks=count(r"down_blocks\.0\.resnets\.(\d+)\."),
        transformer_depth=depth,
        transformer_depth_middle=count(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
        context_dim=shapes[attn2][1], num_head_channels=64,  # SDXL's; head counts are invisible in shapes
        use_linear_in_transformer=len(shapes["mid_block.attentions.0.proj_in.weight"]) == 2, adm_in_channels=adm,
    )
    if "task_embedding" not in shapes:
        return ControlNetConfig(unet, _hint_channels(hint), "diffusers")
    types = shapes["task_embedding"][0]
    type_dim = shapes["control_add_embedding.linear_1.weight"][1] // types
    return ControlNetConfig(unet, _hint_channels(hint), "diffusers", types, type_dim)


def hint_convs(channels: Sequence[int]) -> list[nn.Conv2d]:
    """The hint encoder's 3x3 convolutions; every second one between the first and the last halves the size
    (cldm: 3->16, 16->16, 16->32 s2, 32->32, 32->96 s2, 96->96, 96->256 s2, 256->320), 8x in all."""
    convs = []
    n = len(channels) - 1
    for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
        stride = 2 if i % 2 == 0 and 0 < i < n - 1 else 1
        convs.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1))
    return convs


class ControlNet(nn.Module):
    """The cldm ControlNet (original SD 1.5 files): the UNet's ``time_embed`` / ``input_blocks`` / ``middle_block``,
    ``input_hint_block`` (hint convs with SiLU between), one 1x1 ``zero_convs`` entry per input block, and
    ``middle_block_out``."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config.unet
        self.controlnet_config = config
        self.time_embed, self.label_emb = embeddings(config.unet)
        self.input_blocks, self.middle_block, skips = encoder(config.unet)
        layers: list[nn.Module] = []
        for conv in hint_convs(config.hint_channels):
            layers += [conv, nn.SiLU()]
        self.input_hint_block = nn.Sequential(*layers[:-1])
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in skips)
        self.middle_block_out = nn.Sequential(nn.Conv2d(skips[-1], skips[-1], 1))

    @property
    def family(self) -> str:
        return self.controlnet_config.family

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None, control_type: int | None = None) -> Residuals:
        """Residuals for ``x`` (b, c, h, w) under ``hint`` (b, 3, 8h, 8w) in [0, 1]: 12 down + 1 mid for SD 1.5."""
        dtype = self.time_embed[0].weight.dtype
        emb = embed(self, timesteps, y, x.shape[0], x.device)
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype))
        h, down = x.to(dtype), []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context, None, 1, None)
            if i == 0:
                h = h + guided
            down.append(zero(h))
        h = self.middle_block(h, emb, context, None, 1, None)
        return down, self.middle_block_out(h)


# ---- diffusers layout (SDXL ControlNets) -----------------------------------------------------------------------

class TimestepEmbedding(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(dim_in, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """The LDM ResBlock under diffusers' names."""

    def __init__(self, c_in: int, c_out: int, emb_channels: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_channels, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(32, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsampler(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DownBlock(nn.Module):
    """``resnets.j`` (+ ``attentions.j``) per layer, then ``downsamplers.0``; returns every layer's output."""

    def __init__(self, config: UNetConfig, c_in: int, c_out: int, depth: int, downsample: bool, mid: bool = False):
        super().__init__()
        emb_ch = 4 * config.model_channels
        n = 2 if mid else config.num_res_blocks
        self.resnets = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, emb_ch) for j in range(n))
        n_attn = 1 if mid else (n if depth else 0)
        self.attentions = nn.ModuleList(_transformer(config, c_out, depth) for _ in range(n_attn))
        self.downsamplers = nn.ModuleList([Downsampler(c_out)] if downsample else [])
        self.mid = mid

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        if self.mid:  # resnet, attention, resnet
            h = self.attentions[0](self.resnets[0](h, emb), context)
            return [self.resnets[1](h, emb)]
        outs = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions:
                h = self.attentions[j](h, context)
            outs.append(h)
        for down in self.downsamplers:
            outs.append(down(outs[-1]))
        return outs


def diffusers_encoder(c: UNetConfig, block=DownBlock, **block_kwargs):
    """``down_blocks``, ``controlnet_down_blocks``, ``mid_block``, ``controlnet_mid_block`` of a diffusers-layout
    ControlNet; ``block`` builds each down block (SparseCtrl's adds motion modules, ``block_kwargs`` its settings)."""
    mc = c.model_channels
    channels = [mc * m for m in c.channel_mult]
    down_blocks = nn.ModuleList(
        block(c, ([mc] + channels)[i], ch, c.transformer_depth[i], i < len(channels) - 1, **block_kwargs)
        for i, ch in enumerate(channels))
    skips = [mc] + [ch for i, ch in enumerate(channels) for _ in range(c.num_res_blocks + (i < len(channels) - 1))]
    mid_block = DownBlock(c, channels[-1], channels[-1], c.transformer_depth_middle, False, mid=True)
    return (down_blocks, nn.ModuleList(nn.Conv2d(ch, ch, 1) for ch in skips), mid_block,
            nn.Conv2d(channels[-1], channels[-1], 1))


class ConditionEmbedding(nn.Module):
    """diffusers' ``controlnet_cond_embedding``: ``conv_in``, ``blocks``, ``conv_out`` with SiLU between."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        convs = hint_convs(channels)
        self.conv_in, self.conv_out = convs[0], convs[-1]
        self.blocks = nn.ModuleList(convs[1:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv_in, *self.blocks):
            x = F.silu(conv(x))
        return self.conv_out(x)


class ResidualAttentionBlock(nn.Module):
    """The union model's condition transformer layer (open_clip's block, quick-GELU MLP). Its attention runs on
    ``nn.MultiheadAttention`` without ``batch_first``, so, as in the original and in diffusers, it attends across
    the batch axis for each condition token."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class DiffusersControlNet(nn.Module):
    """SDXL ControlNets in the diffusers layout (``ControlNetModel`` / ``ControlNetUnionModel`` names)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        c = config.unet
        self.config, self.controlnet_config = c, config
        mc, emb_ch = c.model_channels, 4 * c.model_channels
        self.conv_in = nn.Conv2d(c.in_channels, mc, 3, padding=1)
        self.time_embedding = TimestepEmbedding(mc, emb_ch)
        if c.adm_in_channels:
            self.add_embedding = TimestepEmbedding(c.adm_in_channels, emb_ch)
        self.controlnet_cond_embedding = ConditionEmbedding(config.hint_channels)
        if config.union:
            self.control_add_embedding = TimestepEmbedding(config.num_control_types * config.control_type_dim, emb_ch)
            self.task_embedding = nn.Parameter(torch.zeros(config.num_control_types, mc))
            self.transformer_layes = nn.ModuleList([ResidualAttentionBlock(mc, UNION_HEADS)])
            self.spatial_ch_projs = nn.Linear(mc, mc)
        self.down_blocks, self.controlnet_down_blocks, self.mid_block, self.controlnet_mid_block = diffusers_encoder(c)

    @property
    def family(self) -> str:
        return self.controlnet_config.family

    def union_embedding(self, control_type: int, batch: int, device: torch.device, dtype: torch.dtype):
        """``control_add_embedding`` of the one-hot control-type vector: each entry embedded like a timestep."""
        n = self.controlnet_config.num_control_types
        if not 0 <= control_type < n:
            raise ConfigError(f"control_type {control_type} outside the union model's {n} control types")
        onehot = torch.zeros(n, device=device)
        onehot[control_type] = 1
        emb = timestep_embedding(onehot, self.controlnet_config.control_type_dim).reshape(1, -1).to(dtype)
        return self.control_add_embedding(emb).expand(batch, -1)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None, control_type: int | None = None) -> Residuals:
        """Residuals for ``x`` (b, c, h, w) under ``hint`` (b, 3, 8h, 8w) in [0, 1]; ``control_type``: the union
        model's control-type index (:data:`UNION_CONTROL_TYPES`)."""
        dtype = self.conv_in.weight.dtype
        bf = x.shape[0]
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        t = t.expand(bf) if t.numel() == 1 else t
        emb = self.time_embedding(timestep_embedding(t, self.config.model_channels).to(dtype))
        if self.config.adm_in_channels:
            emb = emb + self.add_embedding(y.to(dtype))
        context = context.to(dtype)
        h = self.conv_in(x.to(dtype))
        condition = self.controlnet_cond_embedding(hint.to(dtype))
        if self.controlnet_config.union:
            if control_type is None:
                raise ConfigError("the union ControlNet needs a control_type (e.g. 3 for canny/lineart, 6 for tile)")
            emb = emb + self.union_embedding(control_type, bf, x.device, dtype)
            tokens = torch.stack([condition.mean((2, 3)) + self.task_embedding[control_type], h.mean((2, 3))], 1)
            for layer in self.transformer_layes:
                tokens = layer(tokens)
            condition = condition + self.spatial_ch_projs(tokens[:, 0])[:, :, None, None]
        h = h + condition
        outs = [h]
        for block in self.down_blocks:
            outs += block(outs[-1], emb, context)
        mid = self.mid_block(outs[-1], emb, context)[0]
        return [conv(o) for conv, o in zip(self.controlnet_down_blocks, outs)], self.controlnet_mid_block(mid)


def build_controlnet(config: ControlNetConfig) -> ControlNet | DiffusersControlNet:
    return (DiffusersControlNet if config.layout == "diffusers" else ControlNet)(config)
