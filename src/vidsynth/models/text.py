"""CLIP text encoders in the layouts of the single-file checkpoints.

``CLIPTextModel``: Hugging Face layout (``text_model.*``), CLIP ViT-L/14 of SD 1.5 and SDXL's first encoder.
``OpenCLIPTextModel``: open_clip layout (``token_embedding``, ``transformer.resblocks.*``), SDXL's ViT-bigG.
Both are pre-LayerNorm causal transformers; they differ in names, fused q/k/v and the activation.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from .layers import attention

EOS_ID = 49407  # CLIP's end-of-text token; pooled outputs are read at its first occurrence

HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
OPEN_CLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.")


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    width: int
    layers: int
    heads: int
    max_positions: int
    activation: Literal["quick_gelu", "gelu"]
    projection_dim: int | None
    layout: Literal["hf", "open_clip"]
    mlp_width: int | None = None  # None: 4 * width, as in every released CLIP

    @property
    def hidden_mlp(self) -> int:
        return self.mlp_width or 4 * self.width

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]]) -> "TextEncoderConfig":
        """Read the config off key names and shapes (keys without the checkpoint's prefix; values are shapes or
        tensors)."""
        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"text encoder weights lack {key!r}; the file is incomplete or not a CLIP text "
                                      "encoder")
            return tuple(getattr(shapes[key], "shape", shapes[key]))

        def count(pattern: re.Pattern) -> int:
            return len({m.group(1) for key in shapes if (m := pattern.match(key))})

        if "text_model.embeddings.token_embedding.weight" in shapes:
            vocab, width = shape("text_model.embeddings.token_embedding.weight")
            projection = shape("text_projection.weight")[0] if "text_projection.weight" in shapes else None
            return cls(vocab, width, count(HF_LAYER), width // 64,
                       shape("text_model.embeddings.position_embedding.weight")[0], "quick_gelu", projection, "hf",
                       shape("text_model.encoder.layers.0.mlp.fc1.weight")[0])
        if "token_embedding.weight" in shapes:
            vocab, width = shape("token_embedding.weight")
            projection = shape("text_projection")[1] if "text_projection" in shapes else None
            return cls(vocab, width, count(OPEN_CLIP_LAYER), width // 64, shape("positional_embedding")[0], "gelu",
                       projection, "open_clip", shape("transformer.resblocks.0.mlp.c_fc.weight")[0])
        some = ", ".join(sorted(shapes)[:3])
        raise CheckpointError(f"not a CLIP text encoder (keys start {some}...); expected 'text_model.*' (Hugging Face) "
                              "or 'token_embedding'/'transformer.resblocks.*' (open_clip) after stripping the prefix")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
        self.name, self.fn = name, ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal SDPA over ``(batch, tokens, heads*dim)`` tensors."""
    b, n, inner = q.shape
    q, k, v = (t.reshape(b, n, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, n, inner)


class _TextEncoder(nn.Module):
    """Shared forward; subclasses name the parts (``embed``, ``blocks``, ``final_norm``, ``project``)."""

    config: TextEncoderConfig

    def embed(self, input_ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.LayerNorm:
        raise NotImplementedError

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def token_vectors(self, table: nn.Embedding, input_ids: torch.Tensor,
                      extra: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings; ids past the vocabulary index ``extra`` (textual-inversion vectors, row 0 = the first id
        after the vocabulary)."""
        vocab = table.num_embeddings
        if extra is None or not bool((input_ids >= vocab).any()):
            return table(input_ids)
        out = table(input_ids.clamp(max=vocab - 1))
        added = input_ids >= vocab
        out[added] = extra.to(out.device, out.dtype)[input_ids[added] - vocab]
        return out

    def forward(self, input_ids: torch.Tensor, *, hidden_layer: int = -1, final_norm: bool = True,
                extra_embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, pooled)``: ``hidden`` is the output of transformer layer ``hidden_layer`` (-1 last, -2
        penultimate...), after the final LayerNorm when ``final_norm``; ``pooled`` is the final-normed last layer at
        the first eos token, projected where the model has a projection. ``extra_embeddings`` (n, width) are the
        vectors of ids from the vocabulary size on (textual inversion)."""
        layers, n = self.config.layers, input_ids.shape[-1]
        if not -layers <= hidden_layer < layers:
            raise ConfigError(f"hidden_layer={hidden_layer} but the text encoder has {layers} layers; "
                              f"use -1..-{layers} (clip skip 1..{layers})")
        if n > self.config.max_positions:
            raise ConfigError(f"{n} tokens exceed the text encoder's {self.config.max_positions} positions; "
                              "split the prompt into chunks (CLIPTokenizer.chunks)")
        keep = hidden_layer % layers
        x = self.embed(input_ids, extra_embeddings)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == keep:
                hidden = x
        last = self.final_norm(x)
        if final_norm:
            hidden = last if keep == layers - 1 else self.final_norm(hidden)
        eos = (input_ids == EOS_ID).int().argmax(dim=-1)  # the first eos, also when eos pads
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        return hidden, self.project(pooled)


# ---- Hugging Face layout -------------------------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    """Self-attention with Hugging Face CLIP names; causal in the text tower, bidirectional in the vision tower."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attend = causal_attention if self.causal else attention
        return self.out_proj(attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.hidden_mlp)
        self.act = Activation(config.activation)
        self.fc2 = nn.Linear(config.hidden_mlp, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer. ``config`` needs ``width``, ``heads``, ``hidden_mlp`` and ``activation``
    (a :class:`TextEncoderConfig` or the vision tower's config)."""

    def __init__(self, config: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(config.width, config.heads, causal)
        self.layer_norm1 = nn.LayerNorm(config.width)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)
        # Kept only so the files' key loads; forward ignores it because some fine-tuned files carry it as corrupted
        # floats (76.99...) that would shift positions.
        self.register_buffer("position_ids", torch.arange(config.max_positions).unsqueeze(0), persistent=True)


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, causal) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width)


class CLIPTextModel(_TextEncoder):
    """CLIP text encoder with Hugging Face names (``text_model.*``; ``text_projection`` when projected)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def embed(self, input_ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.text_model.embeddings
        return (self.token_vectors(embeddings.token_embedding, input_ids, extra)
                + embeddings.position_embedding.weight[:input_ids.shape[-1]])

    @property
    def blocks(self) -> nn.ModuleList:
        return self.text_model.encoder.layers

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.text_model.final_layer_norm

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text_projection(pooled) if self.config.projection_dim else pooled


# ---- open_clip layout ----------------------------------------------------------------------------------------------

class FusedAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter names (fused ``in_proj``), causal SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(causal_attention(q, k, v, self.heads))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = FusedAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(config.width, config.hidden_mlp),
                                             gelu=Activation(config.activation),
                                             c_proj=nn.Linear(config.hidden_mlp, config.width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class OpenCLIPTextModel(_TextEncoder):
    """open_clip text tower (SDXL's ViT-bigG): ``text_projection`` [width, dim] is applied as ``x @ P``."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.randn(config.max_positions, config.width) * 0.01)
        self.transformer = OpenCLIPTransformer(config)
        self.ln_final = nn.LayerNorm(config.width)
        if config.projection_dim:
            self.text_projection = nn.Parameter(torch.randn(config.width, config.projection_dim) * config.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))  # contrastive temperature: in the file, unused here

    def embed(self, input_ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.token_vectors(self.token_embedding, input_ids, extra) + self.positional_embedding[:input_ids.shape[-1]]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.ln_final

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.text_projection if self.config.projection_dim else pooled


def build_text_encoder(shapes: Mapping[str, Sequence[int]]) -> CLIPTextModel | OpenCLIPTextModel:
    """The text encoder matching a state dict's keys and shapes (prefix already stripped), randomly initialised:
    load the file's weights next (build it under ``torch.device("meta")`` and load with ``assign=True``)."""
    config = TextEncoderConfig.from_state_dict(shapes)
    return (CLIPTextModel if config.layout == "hf" else OpenCLIPTextModel)(config)


def encode_chunks(model: _TextEncoder, ids: torch.Tensor, **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``(n, k, 77)`` chunked ids (``CLIPTokenizer.chunks``) in one batch: ``(hidden (n, k*77, width),
    pooled (n, dim))``, pooled taken from each text's first chunk as the web UIs do."""
    n, k, length = ids.shape
    hidden, pooled = model(ids.reshape(n * k, length), **forward_kwargs)
    return hidden.reshape(n, k * length, hidden.shape[-1]), pooled.reshape(n, k, -1)[:, 0]
