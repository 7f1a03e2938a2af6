"""SparseCtrl (AnimateDiff v3, guoyww/AnimateDiff ``animatediff/models/sparse_controlnet.py``): a ControlNet with its
own motion modules that reads a few keyframes and returns residuals for every frame of the clip.

Files ``v3_sd15_sparsectrl_rgb.ckpt`` / ``v3_sd15_sparsectrl_scribble.ckpt``: the diffusers-named SD 1.5 ControlNet
encoder (the ControlNet code's diffusers layout: ``conv_in``, ``time_embedding``, ``down_blocks``, ``mid_block``,
``controlnet_down_blocks``, ``controlnet_mid_block``) plus ``down_blocks.i.motion_modules.j`` after each
resnet + attention layer, with ONE temporal attention block each. Differences from a ControlNet, as in the original:

- the noisy latent input is replaced by zeros (``set_noisy_sample_input_to_zero``): only the condition and the
  timestep reach the encoder;
- the condition is concatenated with a 1-channel mask (1 on the keyframes, 0 elsewhere; unconditioned frames hold
  zeros) before ``controlnet_cond_embedding``;
- RGB ("simplified condition embedding"): the keyframes are VAE-encoded latents (x 0.18215) and the embedding is one
  3x3 conv at latent resolution; scribble: the image in [0, 1] at full resolution through the usual hint encoder;
- its motion modules normalise each frame on their own (GroupNorm on ``(b*f, c, h, w)``, as the original's
  TemporalTransformer3DModel in the main branch; diffusers' port pools over frames).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .controlnet import ConditionEmbedding, DownBlock, Residuals, TimestepEmbedding, _hint_channels, diffusers_encoder
from .layers import timestep_embedding
from .motion import MotionModule
from .unet import UNetConfig

MOTION_HEADS = 8  # motion_module_kwargs.num_attention_heads of both released configs


@dataclass(frozen=True)
class SparseCtrlConfig:
    unet: UNetConfig
    condition_channels: int          # without the mask channel: 4 (RGB latents) or 3 (scribble image)
    simplified: bool                 # RGB: a single conv at latent resolution
    hint_channels: tuple[int, ...]   # scribble: the hint encoder's channels (4 = 3 + mask, 16, ..., 320)
    pe_length: int

    @property
    def kind(self) -> str:
        return "rgb" if self.simplified else "scribble"

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]]) -> "SparseCtrlConfig":
        def count(pattern: str) -> int:
            found = {int(m[1]) for k in shapes if (m := re.match(pattern, k))}
            return max(found) + 1 if found else 0

        try:
            levels = count(r"down_blocks\.(\d+)\.")
            mc = shapes["conv_in.weight"][0]
            channels = [shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]
            depth = tuple(count(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in range(levels))
            pe = next(s for k, s in shapes.items() if k.endswith("pos_encoder.pe"))[1] \
                if any(k.endswith("pos_encoder.pe") for k in shapes) else 32
            unet = UNetConfig(
                in_channels=shapes["conv_in.weight"][1], out_channels=shapes["conv_in.weight"][1], model_channels=mc,
                channel_mult=tuple(c // mc for c in channels), num_res_blocks=count(r"down_blocks\.0\.resnets\.(\d+)\."),
                transformer_depth=depth,
                transformer_depth_middle=count(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
                context_dim=shapes["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"][1],
                num_heads=8,  # SD 1.5's (invisible in shapes)
                use_linear_in_transformer=len(shapes["mid_block.attentions.0.proj_in.weight"]) == 2)
            if "controlnet_cond_embedding.weight" in shapes:
                return cls(unet, shapes["controlnet_cond_embedding.weight"][1] - 1, True, (), pe)
            hint = [shapes["controlnet_cond_embedding.conv_in.weight"]]
            hint += [shapes[f"controlnet_cond_embedding.blocks.{i}.weight"]
                     for i in range(count(r"controlnet_cond_embedding\.blocks\.(\d+)\."))]
            hint += [shapes["controlnet_cond_embedding.conv_out.weight"]]
        except (KeyError, StopIteration) as err:
            raise CheckpointError(f"not a SparseCtrl file: lacks {err}") from None
        hint_channels = _hint_channels(hint)
        return cls(unet, hint_channels[0] - 1, False, hint_channels, pe)


class SparseDownBlock(DownBlock):
    """A ControlNet down block with a motion module after each resnet + attention layer."""

    def __init__(self, config: UNetConfig, c_in: int, c_out: int, depth: int, downsample: bool, pe_length: int):
        super().__init__(config, c_in, c_out, depth, downsample)
        self.motion_modules = nn.ModuleList(MotionModule(c_out, MOTION_HEADS, pe_length, attention_blocks=1)
                                            for _ in self.resnets)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
        outs = []
        for j, (resnet, motion) in enumerate(zip(self.resnets, self.motion_modules)):
            h = resnet(h, emb)
            if self.attentions:
                h = self.attentions[j](h, context)
            outs.append(h := motion(h, num_frames))
        return outs + [down(outs[-1]) for down in self.downsamplers]


class SparseControlNet(nn.Module):
    def __init__(self, config: SparseCtrlConfig):
        super().__init__()
        c = config.unet
        self.config, self.sparse_config = c, config
        mc = c.model_channels
        self.conv_in = nn.Conv2d(c.in_channels, mc, 3, padding=1)
        self.time_embedding = TimestepEmbedding(mc, 4 * mc)
        if config.simplified:
            self.controlnet_cond_embedding = nn.Conv2d(config.condition_channels + 1, mc, 3, padding=1)
        else:
            self.controlnet_cond_embedding = ConditionEmbedding(config.hint_channels)
        self.down_blocks, self.controlnet_down_blocks, self.mid_block, self.controlnet_mid_block = diffusers_encoder(
            c, SparseDownBlock, pe_length=config.pe_length)

    @property
    def family(self) -> str:
        return self.config.family

    def forward(self, x: torch.Tensor, condition: torch.Tensor, mask: torch.Tensor, timesteps: torch.Tensor | float,
                context: torch.Tensor, num_frames: int, scale: float = 1.0) -> Residuals:
        """Residuals for the (b*f, 4, h, w) batch ``x`` (only its shape is used: the input is zeroed). ``condition``:
        (b*f, 4, h, w) keyframe latents (RGB) or (b*f, 3, 8h, 8w) images in [0, 1] (scribble), zeros on frames
        without a keyframe; ``mask``: (b*f, 1, ...) of the same size, 1 on keyframes."""
        dtype = self.conv_in.weight.dtype
        bf = x.shape[0]
        if num_frames < 1 or bf % num_frames:
            raise ConfigError(f"batch of {bf} frames is not a whole number of {num_frames}-frame clips")
        want = self.sparse_config.condition_channels
        if condition.shape[0] != bf or condition.shape[1] != want or mask.shape[-2:] != condition.shape[-2:]:
            raise ConfigError(f"SparseCtrl ({self.sparse_config.kind}) takes a ({bf}, {want}, h, w) condition and a "
                              f"(…, 1, h, w) mask, got {tuple(condition.shape)} and {tuple(mask.shape)}")
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        t = t.expand(bf) if t.numel() == 1 else t
        emb = self.time_embedding(timestep_embedding(t, self.config.model_channels).to(dtype))
        context = context.to(dtype)
        h = self.conv_in(torch.zeros_like(x, dtype=dtype))
        h = h + self.controlnet_cond_embedding(torch.cat([condition, mask], dim=1).to(dtype))
        outs = [h]
        for block in self.down_blocks:
            outs += block(outs[-1], emb, context, num_frames)
        mid = self.mid_block(outs[-1], emb, context)[0]
        down = [conv(o) * scale for conv, o in zip(self.controlnet_down_blocks, outs)]
        return down, self.controlnet_mid_block(mid) * scale
