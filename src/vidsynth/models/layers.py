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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = attention(q, k, v, self.heads)
        return self.to_out(out)


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
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net.0.proj`` [2*mult*dim, dim], ``net.2`` [dim, mult*dim]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
