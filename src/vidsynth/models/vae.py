"""AutoencoderKL of SD 1.5 / SDXL in the LDM layout (``first_stage_model.*`` with the prefix stripped).

``encoder.{conv_in, down.N.{block.M, downsample}, mid.{block_1, attn_1, block_2}, norm_out, conv_out}``,
``decoder.{conv_in, mid, up.N.{block.M, upsample}, norm_out, conv_out}``, ``quant_conv``, ``post_quant_conv``.
The decoder's ``up.N`` is level N (``up.0`` is the full-resolution level), so it runs ``up`` in reverse.

Latents are raw: the pipeline owns the scaling factor (0.18215 SD 1.5, 0.13025 SDXL).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..runtime import layout_of, prepare_convolutions
from ..sampling import seeded_randn_like
from .layers import add, attention, norm_silu


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32  # not stored in checkpoints; 32 in every LDM VAE

    def __post_init__(self) -> None:
        bad = [c for c in self.level_channels if c % self.norm_groups]
        if bad or not self.channel_mult or self.num_res_blocks < 1:
            raise ConfigError(f"VAE config {self} does not work: channels {bad} are not divisible by norm_groups="
                              f"{self.norm_groups}, or channel_mult/num_res_blocks is empty; pick divisible sizes.")

    @property
    def level_channels(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]]) -> VAEConfig:
        """Read the config off tensor shapes of a VAE state dict (keys without ``first_stage_model.``)."""
        required = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight",
                    "post_quant_conv.weight", "encoder.down.0.block.0.conv1.weight")
        missing = [k for k in required if k not in shapes]
        if missing:
            hint = (" Strip the 'first_stage_model.' prefix first." if any(k.startswith("first_stage_model.")
                                                                           for k in shapes) else "")
            raise CheckpointError(f"Not an LDM AutoencoderKL state dict: missing {missing}.{hint}")
        base = int(shapes["encoder.conv_in.weight"][0])
        levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
        mult = tuple(int(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]) // base for i in range(levels))
        blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
        latent = int(shapes["post_quant_conv.weight"][0])
        if int(shapes["encoder.conv_out.weight"][0]) != 2 * latent:
            raise CheckpointError("Not a KL autoencoder: encoder.conv_out must give mean and log-variance "
                                  f"(2 x {latent} channels), got {shapes['encoder.conv_out.weight'][0]}.")
        return cls(in_channels=int(shapes["encoder.conv_in.weight"][1]),
                   out_channels=int(shapes["decoder.conv_out.weight"][0]), latent_channels=latent,
                   base_channels=base, channel_mult=mult, num_res_blocks=blocks)


def GroupNorm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin)
        self.conv1 = _conv3(cin, cout)
        self.norm2 = GroupNorm(groups, cout)
        self.conv2 = _conv3(cout, cout)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(x, self.norm1))
        h = self.conv2(norm_silu(h, self.norm2))
        return add(h, self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; q/k/v/proj_out are 1x1 convs as in the file."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(groups, channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))
        # the input's layout again: a conv input in another layout than the weights' makes oneDNN reorder them
        out = attention(q, k, v, heads=1).transpose(1, 2).reshape(b, c, h, w).contiguous(memory_format=layout_of(x))
        return add(self.proj_out(out), x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block.M`` resnets, then an optional ``downsample`` / ``upsample``."""

    def __init__(self, cin: int, cout: int, depth: int, groups: int, resample: type[nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(depth))
        if resample is Downsample:
            self.downsample = Downsample(cout)
        elif resample is Upsample:
            self.upsample = Upsample(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, "downsample", None) or getattr(self, "upsample", None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, g = cfg.level_channels, cfg.norm_groups
        last = len(chans) - 1
        self.conv_in = _conv3(cfg.in_channels, cfg.base_channels)
        self.down = nn.ModuleList(
            Level(chans[i - 1] if i else cfg.base_channels, chans[i], cfg.num_res_blocks, g,
                  Downsample if i < last else None) for i in range(len(chans)))
        self.mid = MidBlock(chans[-1], g)
        self.norm_out = GroupNorm(g, chans[-1])
        self.conv_out = _conv3(chans[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(norm_silu(self.mid(x), self.norm_out))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, g = cfg.level_channels, cfg.norm_groups
        last = len(chans) - 1
        self.conv_in = _conv3(cfg.latent_channels, chans[-1])
        self.mid = MidBlock(chans[-1], g)
        self.up = nn.ModuleList(
            Level(chans[i + 1] if i < last else chans[-1], chans[i], cfg.num_res_blocks + 1, g,
                  Upsample if i > 0 else None) for i in range(len(chans)))
        self.norm_out = GroupNorm(g, chans[0])
        self.conv_out = _conv3(chans[0], cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(norm_silu(x, self.norm_out))


class AutoencoderKL(nn.Module):
    """The SD VAE. ``upcast_decoder``: when the decoder's parameters are float16, the first ``decode`` casts the
    decoder and ``post_quant_conv`` to float32 in place and they stay there (about 200 MB for the SD VAE decoder);
    the SDXL VAE overflows in float16 (black / NaN frames). bfloat16 has float32's range and is left alone."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.upcast_decoder = True
        # decoder activations per call when decode(batch_size=None): 2 frames of 256x256 or 1 of 512x512 in bf16.
        # Smaller batches decode no slower on a CPU (profile_parts.py decoder --frames 8 --batch-size N --time 2,
        # 256x256 bf16: 12.4-12.8 s for N = 2, 4, 5, 8, peak +224, 384, 496, 768 MiB); GPUs were not measured
        self.decode_budget_bytes = 256 * 1024 ** 2
        self.scaling_factor = 0.18215  # latent scale of SD 1.5; ModelManager sets SDXL's 0.13025 for SDXL files

    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(n, in_channels, H, W)`` in [-1, 1] -> raw latents ``(n, latent, H/8, W/8)``: the posterior
        mean, or a sample of it."""
        self._check(images, self.config.in_channels, "images")
        p = self.quant_conv.weight
        prepare_convolutions(self, p)
        moments = self.quant_conv(self.encoder(images.to(p.device, p.dtype))).contiguous()
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        noise = seeded_randn_like(mean, generator)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise

    def decode(self, latents: torch.Tensor, *, tile: bool | None = None, tile_size: int = 64,
               tile_overlap: int = 16, batch_size: int | None = None) -> torch.Tensor:
        """Raw latents ``(n, latent, h, w)`` -> images ``(n, out_channels, 8h, 8w)`` in the decoder's dtype.
        ``tile=None`` tiles when h or w exceeds ``tile_size``; ``batch_size`` decodes that many frames at a time
        (None: as many as fit :meth:`decode_batch_size`, so peak memory does not grow with the frame count)."""
        self._check(latents, self.config.latent_channels, "latents")
        if not 0 <= tile_overlap < tile_size:
            raise ConfigError(f"tile_overlap={tile_overlap} must be >= 0 and below tile_size={tile_size}.")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be a positive number of frames (or None).")
        if self.upcast_decoder and self.post_quant_conv.weight.dtype == torch.float16:
            self.decoder.float()
            self.post_quant_conv.float()
        p = self.post_quant_conv.weight
        prepare_convolutions(self, p)
        z = latents.to(p.device, p.dtype)
        if tile is None:
            tile = max(z.shape[-2:]) > tile_size
        chunks = z.split(batch_size or self.decode_batch_size(z, tile_size if tile else None))
        if not tile:
            return torch.cat([self._decode(c) for c in chunks])
        return torch.cat([self._decode_tiled(c, tile_size, tile_overlap) for c in chunks])

    def decode_batch_size(self, z: torch.Tensor, tile_size: int | None = None) -> int:
        """Frames per decoder call so its activations stay under ``decode_budget_bytes`` whatever the frame count
        (peak memory flat in frames). The decoder's peak is about six full-resolution tensors of ``base_channels``
        per frame (94-97 MB per 256x256 frame in bfloat16 with the SD VAE:
        ``benchmarks/profile_parts.py decoder --frames 16 --batch-size N --time 2``)."""
        h, w = z.shape[-2:] if tile_size is None else (min(z.shape[-2], tile_size), min(z.shape[-1], tile_size))
        s = self.config.downscale
        per_frame = 6 * self.config.base_channels * h * s * w * s * self.post_quant_conv.weight.element_size()
        return max(1, min(z.shape[0], self.decode_budget_bytes // per_frame))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z)).contiguous()

    def _decode_tiled(self, z: torch.Tensor, tile_size: int, overlap: int) -> torch.Tensor:
        """Decode overlapping latent tiles on their own and blend them with cosine ramps across each overlap
        (weights normalised, so no seams). GroupNorm statistics and the mid attention are per tile, as in
        diffusers' tiled decode: the result is close to, not equal to, the untiled one."""
        (n, _, h, w), s = z.shape, self.config.downscale
        spans_y, spans_x = _tile_spans(h, tile_size, overlap), _tile_spans(w, tile_size, overlap)
        tiles = [(ys, xs) for ys in spans_y for xs in spans_x]
        weights_y, weights_x = (dict(zip(sp, _blend_weights(sp, s, z))) for sp in (spans_y, spans_x))
        out = weight = torch.empty(0)
        for ys, xs in tiles:
            img = self._decode(z[..., ys[0]:ys[1], xs[0]:xs[1]])
            if not out.numel():
                out = img.new_zeros(n, img.shape[1], h * s, w * s)
                weight = img.new_zeros(1, 1, h * s, w * s)
            wt = weights_y[ys][:, None] * weights_x[xs][None, :]
            region = (..., slice(ys[0] * s, ys[1] * s), slice(xs[0] * s, xs[1] * s))
            out[region] += img * wt
            weight[region] += wt
        return out / weight

    @staticmethod
    def _check(x: torch.Tensor, channels: int, name: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ConfigError(f"{name} must be (n, {channels}, height, width), got {tuple(x.shape)}; fold video "
                              "frames into the batch.")


def _tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Evenly spread ``(start, stop)`` tiles covering ``[0, length)``, neighbours overlapping by at least ``overlap``."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    # floor division keeps every step <= tile - overlap
    return [(s, s + tile) for s in (i * (length - tile) // (count - 1) for i in range(count))]


def _blend_weights(spans: list[tuple[int, int]], scale: int, like: torch.Tensor) -> list[torch.Tensor]:
    """1-D blend weight of each tile in image pixels: cosine ramps across the overlap with each neighbour, strictly
    positive; neighbours' weights there are sin^2 and cos^2 of the same angle, so they sum to one."""
    weights = []
    for i, (start, stop) in enumerate(spans):
        size = (stop - start) * scale
        pos = torch.arange(size, device=like.device, dtype=torch.float32) + 0.5
        wt = torch.ones_like(pos)
        if i > 0:
            wt = wt * torch.sin(0.5 * math.pi * (pos / ((spans[i - 1][1] - start) * scale)).clamp(max=1.0)) ** 2
        if i < len(spans) - 1:
            wt = wt * torch.sin(0.5 * math.pi * ((size - pos) / ((stop - spans[i + 1][0]) * scale)).clamp(max=1.0)) ** 2
        weights.append(wt.to(like.dtype))
    return weights
