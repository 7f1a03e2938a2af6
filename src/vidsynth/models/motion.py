"""AnimateDiff motion modules in the file layout of guoyww/AnimateDiff.

Keys load as they are: ``down_blocks.0.motion_modules.1.temporal_transformer.norm.weight`` is the attribute path of a
:class:`MotionModuleSet`. The version (v1/v2/v3, SDXL beta, AnimateLCM, Lightning) is read off the file's shapes and
decides the details that differ between them (GroupNorm pooling, positional-encoding length, sampling defaults).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import CheckpointError, ConfigError
from ..runtime import is_channels_last
from .frame_windows import FrameWindows
from .layers import Attention, FeedForward, add, group_norm, linear

MOTION_VERSIONS = ("v1", "v2", "v3", "sdxl_beta", "animatelcm", "lightning")

# Each version's own sampling setting; it is the default for that module, users may override it.
# v1/v2/v3: guoyww/AnimateDiff configs/inference/inference-v{1,2,3}.yaml (DDIMScheduler: linear betas 0.00085..0.012,
#   steps_offset 1, clip_sample false; diffusers' DDIM defaults: leading spacing, epsilon), scripts/animate.py with
#   configs/prompts/1_animate/*.yaml (steps 25; guidance 7.5 in the pipeline default and ToonYou, 8 in most prompts).
# sdxl_beta: branch `sdxl`, scripts/animate.py (EulerDiscreteScheduler(timestep_spacing='leading', steps_offset=1)),
#   configs/inference/inference.yaml (scaled_linear 0.00085..0.020), configs/prompts/1-original_sdxl.yaml (100 steps,
#   guidance 8.5).
# animatelcm: G-U-N/AnimateLCM animatelcm_sd15/configs/inference-t2v.yaml (LCM, linear 0.00085..0.012, steps_offset 1,
#   original_inference_steps 100); README "Usage Tips": 4 steps work, 6-8 better, CFG 1-2 (author prefers 1.5).
#   The diffusers model card instead keeps epiCRealism's scheduler config with beta_schedule="linear" (LCMScheduler
#   default original_inference_steps 50) and samples 6 steps at CFG 2.0.
# lightning: ByteDance/AnimateDiff-Lightning model card: EulerDiscreteScheduler.from_config(SD1.5 config,
#   timestep_spacing="trailing", beta_schedule="linear"), guidance_scale=1.0, num_inference_steps = the file's N in
#   "..._{N}step_..." (see sampling_defaults). steps_offset is in the config but trailing spacing does not use it.
DEFAULT_SAMPLING: dict[str, dict] = {
    **{v: {"sampler": "ddim", "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012,
           "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon", "steps": 25,
           "cfg_scale": 7.5} for v in ("v1", "v2", "v3")},
    "sdxl_beta": {"sampler": "euler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.020,
                  "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon", "steps": 100,
                  "cfg_scale": 8.5},
    "animatelcm": {"sampler": "lcm", "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012,
                   "timestep_spacing": "leading", "steps_offset": 1, "original_inference_steps": 100,
                   "prediction_type": "epsilon", "steps": 6, "cfg_scale": 1.5},
    "lightning": {"sampler": "euler", "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012,
                  "timestep_spacing": "trailing", "steps_offset": 1, "prediction_type": "epsilon", "steps": 4,
                  "cfg_scale": 1.0},
}


def sampling_defaults(version: str, filename: str | None = None) -> dict:
    """A copy of ``DEFAULT_SAMPLING[version]``; Lightning files are distilled for the step count in their name."""
    settings = dict(DEFAULT_SAMPLING[version])
    steps = re.search(r"(\d+)[_-]?steps?", filename or "", re.IGNORECASE)
    if version == "lightning" and steps:
        settings["steps"] = int(steps.group(1))
    return settings


# (base family, mid module present) that each version's original code builds.
_VERSION_LAYOUT = {"v1": ("sd15", False), "v2": ("sd15", True), "v3": ("sd15", False),
                   "sdxl_beta": ("sdxl", False), "animatelcm": ("sd15", True), "lightning": ("sd15", True)}
_SITE_KEY = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.motion_modules\.\d+|mid_block\.motion_modules\.\d+)"
                       r"\.temporal_transformer\.(.+)$")


def _site_order(name: str) -> tuple[int, int, int]:
    parts = name.split(".")
    if parts[0] == "mid_block":
        return (1, 0, int(parts[2]))
    return (0 if parts[0] == "down_blocks" else 2, int(parts[1]), int(parts[3]))


@dataclass(frozen=True)
class MotionConfig:
    version: str
    version_reason: str
    sites: dict[str, int] = field(hash=False)
    pe_length: int
    heads: int = 8
    pe_in_file: bool = True  # False for re-saved files without pos_encoder.pe: the tables are then built, not loaded
    filename: str | None = field(default=None, compare=False)  # Lightning's name carries its distilled step count

    def sampling_defaults(self) -> dict:
        return sampling_defaults(self.version, self.filename)

    @property
    def pool_motion_norm(self) -> bool:
        # main branch (v1/v2/v3, and AnimateLCM's copy of it) norms the (b*f, c, h, w) tensor: per frame; the `sdxl`
        # branch norms the 5-D (b, c, f, h, w) tensor: statistics pooled over the clip's frames.
        return self.version == "sdxl_beta"

    @property
    def pool_resnet_norms(self) -> bool:
        # Only inference-v1.yaml sets use_inflated_groupnorm: false (nn.GroupNorm on the 5-D tensor pools over frames).
        # v2/v3 set it true; AnimateLCM's inference-t2v.yaml sets it true too; Lightning was distilled from v2 and is
        # run through diffusers' UNetMotionModel (ResnetBlock2D on (b*f, ...)): per frame. The `sdxl` branch wraps
        # diffusers' ResnetBlock2D and rearranges to (b*f, c, h, w) before every resnet: per frame as well.
        return self.version == "v1"

    @property
    def base_family(self) -> str:
        return _VERSION_LAYOUT[self.version][0]

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]], filename: str | None = None,
                        version: str | None = None) -> "MotionConfig":
        """Read the configuration off a flat motion-module file's keys and shapes (``key -> shape``)."""
        sites, pe_lengths = _read_sites(shapes, filename)
        family = _read_family(sites, filename)
        has_mid = any(name.startswith("mid_block") for name in sites)
        if len(pe_lengths) > 1:
            raise CheckpointError(f"{filename or 'motion module'}: the pos_encoder.pe tables differ in length "
                                  f"({sorted(pe_lengths)}); a motion module has one native frame count")
        pe_length = next(iter(pe_lengths), None)
        version, reason = _pick_version(family, has_mid, pe_length, filename, version)
        if pe_length is None:
            pe_length = 24 if version == "v1" else 32
            reason += f"; no pos_encoder.pe in the file: PE length {pe_length} assumed (the {version} default)"
        return cls(version=version, version_reason=reason, sites=sites, pe_length=pe_length,
                   pe_in_file=bool(pe_lengths), filename=PurePath(filename).name if filename else None)


def _read_sites(shapes: Mapping[str, Sequence[int]], filename: str | None) -> tuple[dict[str, int], set[int]]:
    what = filename or "motion module"
    channels: dict[str, int] = {}
    pe_lengths: set[int] = set()
    strays = []
    for key, shape in shapes.items():
        match = _SITE_KEY.match(key)
        if not match or "_lora." in key:
            strays.append(key)
        elif match.group(2) == "norm.weight":
            channels[match.group(1)] = int(shape[0])
        elif match.group(2).endswith("pos_encoder.pe"):
            pe_lengths.add(int(shape[1]))
    if any("_lora." in key for key in strays):
        raise CheckpointError(f"{what} is a MotionLoRA / LoRA file, not a motion module: load it as a LoRA on top of "
                              f"a motion module")
    if strays or not channels:
        shown = ", ".join(strays[:3]) or "no keys"
        raise CheckpointError(f"{what} is not an AnimateDiff motion module: expected keys like "
                              f"'down_blocks.0.motion_modules.0.temporal_transformer.norm.weight', found {shown}"
                              f"{' ...' if len(strays) > 3 else ''} ({len(strays)} of {len(shapes)} keys do not fit)")
    return dict(sorted(channels.items(), key=lambda item: _site_order(item[0]))), pe_lengths


def _levels(sites: dict[str, int], kind: str) -> list[list[int]]:
    levels: dict[int, list[int]] = {}
    for name, c in sites.items():
        if name.startswith(kind):
            levels.setdefault(int(name.split(".")[1]), []).append(c)
    return [levels[i] for i in sorted(levels)]


def _read_family(sites: dict[str, int], filename: str | None) -> str:
    down, up = _levels(sites, "down_blocks"), _levels(sites, "up_blocks")
    mid = [c for name, c in sites.items() if name.startswith("mid_block")]
    # the structure decides (the channels are checked against the UNet when the module is used), so scaled-down
    # modules of either shape are recognised too
    family = {4: "sd15", 3: "sdxl"}.get(len(down))
    if (family and len(up) == len(down) and all(len(lvl) == 2 for lvl in down) and all(len(lvl) == 3 for lvl in up)
            and len(mid) <= 1 and (not mid or family == "sd15")):
        return family

    def describe(levels: list[list[int]]) -> str:
        return "/".join(f"{lvl[0]}x{len(lvl)}" if len(set(lvl)) == 1 else "+".join(map(str, lvl)) for lvl in levels)

    raise CheckpointError(
        f"{filename or 'motion module'}: unknown motion-module layout: down {describe(down) or 'none'}, "
        f"mid {'x'.join(map(str, mid)) or 'none'}, up {describe(up) or 'none'} (channels x modules per level); "
        f"supported are SD 1.5 (down 320x2/640x2/1280x2/1280x2, up 1280x3/1280x3/640x3/320x3, optional mid 1280) "
        f"and SDXL beta (down 320x2/640x2/1280x2, up 1280x3/640x3/320x3)")


def _pick_version(family: str, has_mid: bool, pe_length: int | None, filename: str | None,
                  version: str | None) -> tuple[str, str]:
    layout = (f"{'3 down levels (320/640/1280)' if family == 'sdxl' else '4 down levels'}, "
              f"{'mid module present' if has_mid else 'no mid module'}, "
              f"{f'PE length {pe_length}' if pe_length else 'no PE tables'}")
    if version is not None:
        if version not in _VERSION_LAYOUT:
            raise ConfigError(f"unknown motion-module version {version!r}; choose one of {', '.join(MOTION_VERSIONS)}")
        want_family, want_mid = _VERSION_LAYOUT[version]
        if (want_family, want_mid) != (family, has_mid):
            raise CheckpointError(
                f"version={version!r} needs a {'SDXL' if want_family == 'sdxl' else 'SD 1.5'} motion module "
                f"{'with' if want_mid else 'without'} a mid module, but {filename or 'the file'} has {layout}; "
                f"leave version unset to read it off the file")
        return version, f"{layout}; version {version!r} given explicitly"
    name = PurePath(filename or "").name.lower()
    if family == "sdxl":
        return "sdxl_beta", f"{layout}: SDXL beta layout"
    if has_mid:
        if "animatelcm" in name:
            return "animatelcm", f"{layout}: v2 layout; file name contains 'AnimateLCM'"
        if "lightning" in name:
            return "lightning", f"{layout}: v2 layout; file name contains 'lightning'"
        return "v2", f"{layout}: v2 layout (AnimateLCM and Lightning share it; name the file or pass version=)"
    if pe_length == 24:
        return "v1", f"{layout}: v1 layout"
    if pe_length is not None:
        return "v3", f"{layout}: v3 layout"
    if "mm_sd_v14" in name or ("mm_sd_v15" in name and "v2" not in name):
        return "v1", f"{layout}: v1 or v3; file name says v1"
    return "v3", f"{layout}: v1 or v3, assumed v3 (pass version='v1' for mm_sd_v14 / mm_sd_v15)"


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """AnimateDiff's positional encoding ``[1, length, dim]``: even channels sin, odd channels cos, base 10000."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * freqs)
    pe[0, :, 1::2] = torch.cos(position * freqs)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, length: int, persistent: bool = True):
        super().__init__()
        self.register_buffer("pe", sinusoid_table(length, dim), persistent=persistent)


class TemporalAttention(Attention):
    """Self-attention across frames; the positional encoding is added to its (already normed) input."""

    def __init__(self, dim: int, heads: int, pe_length: int, pe_persistent: bool = True):
        super().__init__(dim, heads=heads, dim_head=dim // heads)
        self.pos_encoder = PositionalEncoding(dim, pe_length, pe_persistent)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x + self.pos_encoder.pe[:, : x.shape[1]].to(x.dtype), residual=residual)


class TemporalTransformerBlock(nn.Module):
    """``attention_blocks``: 2 in every motion module, 1 in SparseCtrl's (``attention_block_types: [Temporal_Self]``)."""

    def __init__(self, dim: int, heads: int, pe_length: int, pe_persistent: bool = True, attention_blocks: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList(TemporalAttention(dim, heads, pe_length, pe_persistent)
                                              for _ in range(attention_blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(attention_blocks))
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x), residual=x)
        return x

    def forward(self, x: torch.Tensor, windows: FrameWindows | None = None) -> torch.Tensor:
        # FreeNoise: the attentions run per window (positions from 0 in each), the feed-forward once over all frames
        x = self.attend(x) if windows is None else windows.fuse(x, self.attend)
        return self.ff(self.ff_norm(x), residual=x)


class TemporalTransformer(nn.Module):
    """``(b*f, c, h, w) -> (b*f, c, h, w)``: attention along the frame axis at every pixel, plus the residual."""

    def __init__(self, channels: int, heads: int = 8, pe_length: int = 32, pool_norm: bool = False,
                 pe_persistent: bool = True, attention_blocks: int = 2):
        super().__init__()
        self.pe_length = pe_length
        self.pool_norm = pool_norm
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, heads, pe_length, pe_persistent,
                                                                          attention_blocks)])
        self.proj_out = nn.Linear(channels, channels)

    def delta(self, h: torch.Tensor, num_frames: int, windows: FrameWindows | None = None) -> torch.Tensor:
        """What the transformer adds to ``h`` (its output without the residual); ``windows``: FreeNoise's."""
        bf, c, height, width = h.shape
        attended = num_frames if windows is None else min(num_frames, windows.context_length)
        if attended > self.pe_length:
            raise ConfigError(f"{attended} frames exceed the motion module's native length {self.pe_length}; "
                              f"render longer clips with context windows of at most {self.pe_length} frames")
        if bf % num_frames:
            raise ConfigError(f"batch of {bf} frame latents is not a whole number of {num_frames}-frame clips")
        b = bf // num_frames
        channels_last = is_channels_last(h)
        if torch.is_grad_enabled():  # channels-last inputs crash the CPU attention backward in torch 2.13
            h, channels_last = h.contiguous(), False
        x = group_norm(h, self.norm, num_frames if self.pool_norm else None)
        x = x.reshape(b, num_frames, c, height, width).permute(0, 3, 4, 1, 2).reshape(b * height * width, num_frames, c)
        x = linear(self.proj_in, x)
        for block in self.transformer_blocks:
            x = block(x, windows)
        x = linear(self.proj_out, x).reshape(b, height, width, num_frames, c)
        if channels_last:  # the result in the layout of h (frames back in the batch, channels innermost)
            return x.permute(0, 3, 1, 2, 4).reshape(bf, height, width, c).permute(0, 3, 1, 2)
        return x.permute(0, 3, 4, 1, 2).reshape(bf, c, height, width)

    def forward(self, h: torch.Tensor, num_frames: int) -> torch.Tensor:
        return add(self.delta(h, num_frames), h)


class MotionModule(nn.Module):
    def __init__(self, channels: int, heads: int = 8, pe_length: int = 32, pool_norm: bool = False,
                 pe_persistent: bool = True, attention_blocks: int = 2):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, heads, pe_length, pool_norm, pe_persistent,
                                                        attention_blocks)

    def forward(self, h: torch.Tensor, num_frames: int, scale: float | torch.Tensor = 1.0,
                windows: FrameWindows | None = None) -> torch.Tensor:
        """``scale``: a number, or one per frame of the clip ((num_frames,), the same for every clip in the batch)."""
        if not isinstance(scale, torch.Tensor):
            if scale == 0:
                return h
            delta = self.temporal_transformer.delta(h, num_frames, windows)
            return add(delta if scale == 1 else delta * scale, h)
        if scale.shape != (num_frames,):
            raise ConfigError(f"a per-frame motion scale needs one value per frame ({num_frames}), got shape "
                              f"{tuple(scale.shape)}")
        per_row = scale.to(h.device, h.dtype).repeat(h.shape[0] // num_frames)[:, None, None, None]
        return h + per_row * self.temporal_transformer.delta(h, num_frames, windows)


class _MotionBlock(nn.Module):
    """One UNet level's modules, as ``<block>.motion_modules.<j>``."""

    def __init__(self, modules: list[MotionModule]):
        super().__init__()
        self.motion_modules = nn.ModuleList(modules)


class MotionModuleSet(nn.Module):
    """All motion modules of one file. ``site(name)`` gives the callable the UNet applies after that layer."""

    def __init__(self, config: MotionConfig):
        super().__init__()
        self.config = config
        # per-call settings, set by the pipeline before each UNet call (options travel with the call):
        # scale: a number, or a (frames,) tensor for the frames of the clip the UNet sees next (motion-scale schedules)
        # free_noise: FreeNoise's windows inside the modules, or None
        self.scale: float | torch.Tensor = 1.0
        self.free_noise: FrameWindows | None = None
        self.gradient_checkpointing = False

        def make(channels: int) -> MotionModule:
            return MotionModule(channels, config.heads, config.pe_length, config.pool_motion_norm, config.pe_in_file)

        grouped: dict[str, dict[int, dict[int, int]]] = {}
        for name, channels in config.sites.items():
            parts = name.split(".")
            block, level = (parts[0], 0) if parts[0] == "mid_block" else (parts[0], int(parts[1]))
            grouped.setdefault(block, {}).setdefault(level, {})[int(parts[-1])] = channels
        numbered = [sorted(levels) for levels in grouped.values()] + [
            sorted(mods) for levels in grouped.values() for mods in levels.values()]
        if any(indices != list(range(len(indices))) for indices in numbered):
            raise ConfigError(f"motion-module sites are not numbered 0, 1, 2, ... per block: {list(config.sites)}")
        self.down_blocks = self._blocks(grouped.get("down_blocks", {}), make)
        self.up_blocks = self._blocks(grouped.get("up_blocks", {}), make)
        mid = grouped.get("mid_block")
        self.mid_block = _MotionBlock([make(c) for _, c in sorted(mid[0].items())]) if mid else None

    @staticmethod
    def _blocks(levels: dict[int, dict[int, int]], make: Callable[[int], MotionModule]) -> nn.ModuleList:
        return nn.ModuleList(_MotionBlock([make(c) for _, c in sorted(levels[i].items())]) for i in sorted(levels))

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        device = next(self.parameters()).device
        for module in self.modules():  # files without pos_encoder.pe: a set built on "meta" still needs its tables
            if isinstance(module, PositionalEncoding) and module.pe.is_meta:
                module.pe = sinusoid_table(*module.pe.shape[1:]).to(device)
        return result

    @classmethod
    def new(cls, config: MotionConfig) -> "MotionModuleSet":
        """A fresh set for training: every module starts as the identity (``proj_out`` zero, as ``zero_initialize``)."""
        motion = cls(config)
        for module in motion.modules():
            if isinstance(module, TemporalTransformer):
                nn.init.zeros_(module.proj_out.weight)
                nn.init.zeros_(module.proj_out.bias)
        return motion

    def sites(self) -> dict[str, int]:
        return dict(self.config.sites)

    def site(self, name: str) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
        if name not in self.config.sites:
            return None
        module: MotionModule = self.get_submodule(name)

        def apply(h: torch.Tensor, num_frames: int) -> torch.Tensor:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(module, h, num_frames, self.scale, self.free_noise, use_reentrant=False)
            return module(h, num_frames, self.scale, self.free_noise)

        return apply
