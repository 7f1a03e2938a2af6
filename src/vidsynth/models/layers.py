"""Building blocks shared by the UNet, the motion modules and the VAE.

Attribute names follow the LDM / single-file layout (``to_q``, ``to_out.0``, ``ff.net.0.proj``,
``in_layers``, ``emb_layers`` ...) so checkpoints load with ``load_state_dict(strict=True)``.
Tensors are ``(batch, channels, height, width)``; video frames are folded into the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import layout_of


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[cos | sin]`` as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, pool_frames: int | None = None) -> torch.Tensor:
    """GroupNorm on ``(b*f, c, h, w)``; with ``pool_frames=f`` the statistics pool over the f frames of each clip
    (what ``nn.GroupNorm`` does on a 5-D ``(b, c, f, h, w)`` tensor), otherwise each frame is normalised alone."""
    if not pool_frames or pool_frames == 1:
        return norm(x)
    bf, c, *spatial = x.shape
    b = bf // pool_frames
    y = x.reshape(b, pool_frames, c, *spatial).transpose(1, 2)
    y = F.group_norm(y, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return y.transpose(1, 2).reshape(bf, c, *spatial)


def norm_silu(x: torch.Tensor, norm: nn.GroupNorm, pool_frames: int | None = None) -> torch.Tensor:
    """SiLU(GroupNorm(x)); without autograd the SiLU runs in place on the norm's fresh output (one tensor less)."""
    return F.silu(group_norm(x, norm, pool_frames), inplace=not torch.is_grad_enabled())


def add(h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``h + other``, in place into ``h`` without autograd: ``h`` must be a fresh intermediate nobody else holds."""
    return h.add_(other) if not torch.is_grad_enabled() else h + other


# oneDNN's linear with a fused epilogue (the op inductor emits on CPU): the bias, a GELU, a product or a residual add
# are applied to the accumulator before the single write of the output, instead of two or three passes over it. In
# float32 it also replaces MKL's sgemm, which on an AMD CPU (no Intel code path) ran 6-22% slower than oneDNN on the
# UNet's shapes (benchmarks/linear_kernels.py, EPYC Zen 4, 2 threads; bfloat16 level).
_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() \
    else None


def _fusable(layer: nn.Linear, x: torch.Tensor) -> bool:
    return (_LINEAR_POINTWISE is not None and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
            and layer.weight.dtype == x.dtype and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # inductor fuses these itself
            and not (layer._forward_hooks or layer._forward_pre_hooks))  # run-time LoRAs hook the module call


def linear(layer: nn.Linear, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x) + residual``, in one oneDNN call where it can be."""
    if _fusable(layer, x):
        if residual is None:
            return _LINEAR_POINTWISE(x, layer.weight, layer.bias, "none", [], "")
        return _LINEAR_POINTWISE.binary(x, residual, layer.weight, layer.bias, "add")
    out = layer(x)
    return out if residual is None else add(out, residual)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (no bias) and ``to_out.0`` (with bias)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``context`` may hold one entry per group of ``x.shape[0] // context.shape[0]`` consecutive batch items
        (one per clip instead of one per frame): K/V are projected once per entry and the group's queries attend to
        them as one long query sequence, which is the same attention (softmax is per query). ``residual`` is added
        to the output (by the output projection itself where :func:`linear` can)."""
        # contiguous: a strided 3-D context (the per-clip slice, the IP-Adapter's text part) sends F.linear through
        # matmul -> bmm with the weight expanded and copied per item, in every K and V (a sixth of an SDXL CPU step)
        context = x if context is None else context.contiguous()
        q, k, v = linear(self.to_q, x), linear(self.to_k, context), linear(self.to_v, context)
        b, n, inner = q.shape
        if context.shape[0] != b:
            q = q.reshape(context.shape[0], -1, inner)
        out = attention(q, k, v, self.heads).reshape(b, n, inner)
        return linear(self.to_out[0], out, residual)  # to_out.1 is Dropout(0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot-product attention over ``(batch, tokens, heads*dim)`` tensors."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fusable(self.proj, x):  # two oneDNN calls: the gate half with its (erf) GELU, the value half times it
            n, w, b = self.proj.out_features // 2, self.proj.weight, self.proj.bias
            gate = _LINEAR_POINTWISE(x, w[n:], b[n:], "gelu", [], "none")
            return _LINEAR_POINTWISE.binary(x, gate, w[:n], b[:n], "mul")
        x, gate = self.proj(x).chunk(2, dim=-1)
        gate = F.gelu(gate)
        return gate.mul_(x) if not torch.is_grad_enabled() else x * gate


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net.0.proj`` [2*mult*dim, dim], ``net.2`` [dim, mult*dim]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return linear(self.net[2], self.net[0](x), residual)  # net.1 is Dropout(0)


class ResBlock(nn.Module):
    """LDM ResBlock: ``in_layers`` (GroupNorm, SiLU, conv3x3), ``emb_layers`` (SiLU, Linear) added per channel,
    ``out_layers`` (GroupNorm, SiLU, Dropout, conv3x3), ``skip_connection`` (1x1 conv only when channels change).
    ``pool_frames`` pools both GroupNorms over the frames of each clip (see :func:`group_norm`)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(channels, out, 1) if out != channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, pool_frames: int | None = None) -> torch.Tensor:
        h = self.in_layers[2](norm_silu(x, self.in_layers[0], pool_frames))
        h = add(h, self.emb_layers(emb)[:, :, None, None])
        h = self.out_layers[3](norm_silu(h, self.out_layers[0], pool_frames))
        return add(h, self.skip_connection(x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention ``attn1``, cross-attention ``attn2`` on ``context``, GEGLU ``ff``; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads=heads, dim_head=dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), residual=x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6, always per frame), ``proj_in``, ``transformer_blocks`` over the h*w tokens, ``proj_out``,
    residual. The projections are 1x1 convs (SD 1.x, applied before flattening) or Linear layers (SD 2 / SDXL)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)
        if self.use_linear:
            y = linear(self.proj_in, y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = linear(self.proj_out, y)
        # back to the input's layout: a conv fed another layout than its weights' reorders them on every call
        # (oneDNN), which costs up to a third of the UNet's time on CPU
        y = y.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=layout_of(x))
        if not self.use_linear:
            y = self.proj_out(y)
        return add(y, x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv ``op``."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then 3x3 ``conv``. ``size`` (the next skip's h, w) allows latents whose sides are
    not multiples of the total downsampling factor; otherwise the scale is 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)
