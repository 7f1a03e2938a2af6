"""The Stable Diffusion 1.x / 2.x / SDXL image UNet in the single-file layout (LDM ``openaimodel`` / sgm naming).

Keys load as they are after stripping ``model.diffusion_model.``. Video frames are folded into the batch
``(b*f, c, h, w)``; AnimateDiff motion modules plug in at named sites (``down_blocks.i.motion_modules.j``,
``mid_block.motion_modules.0``, ``up_blocks.i.motion_modules.j``) through a ``motion`` object passed to ``forward``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vidsynth.errors import CheckpointError, ConfigError
from vidsynth.models.layers import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
    norm_silu,
    timestep_embedding,
)
from vidsynth.runtime import prepare_convolutions

PREFIX = "model.diffusion_model."

MotionHook = Callable[[torch.Tensor, int], torch.Tensor]


class MotionSites(Protocol):
    def site(self, name: str) -> MotionHook | None: ...


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    transformer_depth: tuple[int, ...]  # per level; 0 = no attention at that level
    transformer_depth_middle: int
    context_dim: int
    num_heads: int | None = None
    num_head_channels: int | None = None
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None  # SDXL: pooled text + Fourier time ids (2816), feeds label_emb

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ConfigError(
                f"transformer_depth {self.transformer_depth} needs one entry per level of {self.channel_mult}"
            )
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ConfigError("give exactly one of num_heads and num_head_channels")
        if self.transformer_depth_middle < 1:
            raise ConfigError("the middle block needs at least one transformer block")

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of an attention layer with ``channels`` channels."""
        if self.num_head_channels:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    @property
    def family(self) -> str:
        """"sd15" or "sdxl" (the families vidsynth renders); "sd2" or "sdxl_refiner" otherwise.
        Inpainting UNets (9 input channels) get an "_inpaint" suffix."""
        # by structure (label_emb or not) first, so scaled-down test models of either shape are recognised too
        if self.adm_in_channels is None:
            name = "sd2" if self.context_dim == 1024 else "sd15"
        else:
            name = "sdxl_refiner" if self.context_dim == 1280 else "sdxl"
        return name + "_inpaint" if self.in_channels == 9 else name

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]], *, encoder_only: bool = False) -> UNetConfig:
        """Read the configuration off key names and shapes (keys without the ``model.diffusion_model.`` prefix).
        ``encoder_only``: the file holds the time embedding, input and middle blocks alone (a ControlNet);
        ``out_channels`` is then ``in_channels``."""
        required = ("time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.1.proj_in.weight")
        required += () if encoder_only else ("out.2.weight",)
        missing = [k for k in required if k not in shapes]
        if missing:
            hint = f' (strip the "{PREFIX}" prefix first)' if any(k.startswith(PREFIX) for k in shapes) else ""
            raise CheckpointError(f"not an SD/SDXL UNet state dict: missing {', '.join(missing)}{hint}")
        if any(k.startswith("label_emb.") for k in shapes) and "label_emb.0.0.weight" not in shapes:
            raise CheckpointError("UNet with a class-label embedding (e.g. the x4 upscaler) is not supported")

        def count(prefix: str) -> int:
            return 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith(prefix)), default=-1)

        mc = shapes["input_blocks.0.0.weight"][0]
        n_in = count("input_blocks.")
        n_out = n_in if encoder_only else count("output_blocks.")
        downs = sorted(int(k.split(".")[1]) for k in shapes if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
        per_level = downs[0] if downs else n_in  # res blocks + the downsampler (or the input conv at level 0)
        levels = len(downs) + 1
        expected_downs = [per_level * (i + 1) for i in range(levels - 1)]
        if n_in != levels * per_level or n_out != levels * per_level or downs != expected_downs:
            raise CheckpointError(f"UNet blocks do not form LDM levels ({n_in} input, {n_out} output blocks)")
        nrb = per_level - 1

        depth: dict[str, int] = {}
        for k in shapes:
            if m := re.match(r"(.+)\.transformer_blocks\.(\d+)\.", k):
                depth[m[1]] = max(depth.get(m[1], 0), int(m[2]) + 1)
        level_depth = []
        for level in range(levels):
            inputs = [f"input_blocks.{level * per_level + 1 + j}.1" for j in range(nrb)]
            outputs = [f"output_blocks.{(levels - 1 - level) * per_level + j}.1" for j in range(per_level)]
            outputs = [] if encoder_only else outputs
            found = {depth.get(p, 0) for p in inputs + outputs}
            if len(found) != 1:
                raise CheckpointError(f"transformer depth varies within level {level}: {sorted(found)}; unsupported")
            level_depth.append(found.pop())
        mult = [shapes[f"input_blocks.{level * per_level + 1}.0.out_layers.3.weight"][0] for level in range(levels)]
        if any(c % mc for c in mult):
            raise CheckpointError(f"level channels {mult} are not multiples of model_channels {mc}")
        context_dim = shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
        sd1 = "label_emb.0.0.weight" not in shapes and context_dim != 1024
        return cls(
            in_channels=shapes["input_blocks.0.0.weight"][1],
            out_channels=shapes["input_blocks.0.0.weight"][1] if encoder_only else shapes["out.2.weight"][0],
            model_channels=mc,
            channel_mult=tuple(c // mc for c in mult),
            num_res_blocks=nrb,
            transformer_depth=tuple(level_depth),
            transformer_depth_middle=depth["middle_block.1"],
            context_dim=context_dim,
            # Head counts are invisible in shapes: SD 1.x uses 8 heads, SD 2 / SDXL 64 channels per head.
            num_heads=8 if sd1 else None,
            num_head_channels=None if sd1 else 64,
            use_linear_in_transformer=len(shapes["middle_block.1.proj_in.weight"]) == 2,
            adm_in_channels=shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None,
        )


def per_clip_context(context: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``(b*f, tokens, dim)`` -> ``(b, tokens, dim)`` when all frames of each clip share one context (the usual
    case: one prompt per clip), so cross-attention projects K/V once per clip instead of once per frame. Contexts
    that differ per frame, or that need their own gradient, are returned as they are."""
    if num_frames < 2 or context.requires_grad or context.shape[0] % num_frames:
        return context
    clips = context.reshape(-1, num_frames, *context.shape[1:])
    first = clips[:, :1]
    return first[:, 0] if torch.equal(clips, first.expand_as(clips)) else context


class UNetBlock(nn.ModuleList):
    """One ``input_blocks`` / ``middle_block`` / ``output_blocks`` entry. Its motion ``site`` (if any) runs before
    layer ``hook_at`` (``len(self)`` = after the last layer): after resnet+attention, before an Upsample."""

    def __init__(self, layers: Sequence[nn.Module], site: str | None = None, channels: int = 0,
                 hook_at: int | None = None):
        super().__init__(layers)
        self.site, self.site_channels = site, channels
        self.hook_at = len(layers) if hook_at is None else hook_at

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, pool_frames: int | None,
                num_frames: int, hook: MotionHook | None, upsample_size: torch.Size | None = None) -> torch.Tensor:
        for i, layer in enumerate(self):
            if i == self.hook_at and hook is not None:
                h = hook(h, num_frames)
            if isinstance(layer, ResBlock):
                h = layer(h, emb, pool_frames)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, Upsample):
                h = layer(h, upsample_size)
            else:
                h = layer(h)
        if self.hook_at == len(self) and hook is not None:
            h = hook(h, num_frames)
        return h


def _transformer(config: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    heads, dim_head = config.heads(ch)
    return SpatialTransformer(ch, heads, dim_head, depth, config.context_dim, config.use_linear_in_transformer)


def _layer(config: UNetConfig, ch_in: int, ch: int, depth: int) -> list[nn.Module]:
    return [ResBlock(ch_in, 4 * config.model_channels, ch)] + ([_transformer(config, ch, depth)] if depth else [])


def embeddings(config: UNetConfig) -> tuple[nn.Sequential, nn.Sequential | None]:
    """``time_embed`` and (SDXL) ``label_emb``."""
    mc, emb_ch = config.model_channels, 4 * config.model_channels
    time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
    if not config.adm_in_channels:
        return time_embed, None
    linear = nn.Sequential(nn.Linear(config.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
    return time_embed, nn.Sequential(linear)


def encoder(config: UNetConfig) -> tuple[nn.ModuleList, UNetBlock, list[int]]:
    """``input_blocks``, ``middle_block`` and the channels of each input block's output (its skip), shared by the
    UNet and the ControlNet (whose files hold the same names)."""
    mc, nrb, levels = config.model_channels, config.num_res_blocks, len(config.channel_mult)
    emb_ch = 4 * mc
    ch = mc
    skips = [ch]
    input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(config.in_channels, mc, 3, padding=1)])])
    for level, (mult, depth) in enumerate(zip(config.channel_mult, config.transformer_depth)):
        for j in range(nrb):
            site = f"down_blocks.{level}.motion_modules.{j}"
            input_blocks.append(UNetBlock(_layer(config, ch, mc * mult, depth), site, mc * mult))
            ch = mc * mult
            skips.append(ch)
        if level != levels - 1:
            input_blocks.append(UNetBlock([Downsample(ch)]))
            skips.append(ch)
    mid = [ResBlock(ch, emb_ch), _transformer(config, ch, config.transformer_depth_middle), ResBlock(ch, emb_ch)]
    return input_blocks, UNetBlock(mid, "mid_block.motion_modules.0", ch, hook_at=2), skips


def embed(model: nn.Module, timesteps: torch.Tensor | float, y: torch.Tensor | None, batch: int,
          device: torch.device) -> torch.Tensor:
    """Time (+ label) embedding of ``model`` (a UNet or a ControlNet: ``time_embed``, ``label_emb``, ``config``)."""
    dtype = model.time_embed[0].weight.dtype
    t = torch.as_tensor(timesteps, device=device).reshape(-1)
    t = t.expand(batch) if t.numel() == 1 else t
    emb = model.time_embed(timestep_embedding(t, model.config.model_channels).to(dtype))
    if model.label_emb is not None:
        emb = emb + model.label_emb(y.to(dtype))
    return emb


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        mc, nrb, levels = config.model_channels, config.num_res_blocks, len(config.channel_mult)
        self.time_embed, self.label_emb = embeddings(config)
        self.input_blocks, self.middle_block, skips = encoder(config)
        ch = skips[-1]

        self.output_blocks = nn.ModuleList()
        for up, level in enumerate(reversed(range(levels))):
            mult, depth = config.channel_mult[level], config.transformer_depth[level]
            for j in range(nrb + 1):
                layers = _layer(config, ch + skips.pop(), mc * mult, depth)
                ch = mc * mult
                hook_at = len(layers)
                if level and j == nrb:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(layers, f"up_blocks.{up}.motion_modules.{j}", ch, hook_at))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1))
        self.compiled_blocks: Callable[..., torch.Tensor] | None = None  # compile_blocks()

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` the blocks, motion modules and output layer (:meth:`run_blocks`) into
        ``compiled_blocks``, which ``forward`` then calls; the time embedding and the per-clip context check stay
        eager. ``options`` go to ``torch.compile``."""
        self.compiled_blocks = torch.compile(self.run_blocks, **options)

    def _blocks(self) -> list[UNetBlock]:
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    def motion_sites(self) -> dict[str, int]:
        """Motion-module site names, in the order they run, mapped to the channels at that site."""
        return {b.site: b.site_channels for b in self._blocks() if b.site}

    def _run(self, block: UNetBlock, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None, *, num_frames: int = 1, motion: MotionSites | None = None,
                pool_resnet_norms: bool = False,
                control: tuple[Sequence[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Noise prediction for ``x`` (b*f, c, h, w). ``timesteps``: (b*f,) or one value for all; ``context``:
        (b*f, tokens, context_dim); ``y``: (b*f, adm_in_channels) for SDXL. ``pool_resnet_norms`` makes the resnet and
        output GroupNorms pool statistics over the ``num_frames`` frames of each clip (AnimateDiff v1).
        ``control`` = (down, mid) ControlNet residuals: ``down[i]`` is added to input block i's output where it is
        kept as a skip (not on the encoder path), ``mid`` to the middle block's output (diffusers'
        ``down_block_additional_residuals`` / ``mid_block_additional_residual``)."""
        bf = x.shape[0]
        if num_frames < 1 or bf % num_frames:
            raise ConfigError(f"batch of {bf} frames is not a whole number of {num_frames}-frame clips")
        if (y is None) != (self.label_emb is None):
            need = "needs y (pooled text + time ids)" if y is None else "takes no y (it has no label_emb)"
            raise ConfigError(f"this UNet ({self.config.family}) {need}")
        dtype = self.time_embed[0].weight.dtype
        prepare_convolutions(self, self.time_embed[0].weight)
        emb = embed(self, timesteps, y, bf, x.device)
        context = per_clip_context(context.to(dtype), num_frames)  # data-dependent: outside the compiled region
        pool = num_frames if pool_resnet_norms and num_frames > 1 else None
        args = (x.to(dtype), emb, context, pool, num_frames, motion, control)
        if self.compiled_blocks is None:
            return self.run_blocks(*args)
        # dynamo does not guard on module hooks by default: a run-time LoRA (forward hooks) put on or taken off after
        # compiling would be ignored by the compiled code instead of compiling again
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return self.compiled_blocks(*args)

    def run_blocks(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, pool: int | None,
                   num_frames: int, motion: MotionSites | None, control) -> torch.Tensor:
        """Every block, the motion modules and the output layer: what :meth:`compile_blocks` compiles."""
        dtype = h.dtype

        def hook(block: UNetBlock) -> MotionHook | None:
            return motion.site(block.site) if motion is not None and block.site else None

        down, mid = control if control is not None else (None, None)
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context, pool, num_frames, hook(block))
            skips.append(h if down is None else h + down[i].to(dtype))
        h = self._run(self.middle_block, h, emb, context, pool, num_frames, hook(self.middle_block))
        h = h if mid is None else h + mid.to(dtype)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            size = skips[-1].shape[-2:] if skips else None
            h = self._run(block, h, emb, context, pool, num_frames, hook(block), size)
        return self.out[2](norm_silu(h, self.out[0], pool)).contiguous()
