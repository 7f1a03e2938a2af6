"""CLIP vision encoders in the Hugging Face layout of the image-encoder files shipped with IP-Adapter.

``models/image_encoder/model.safetensors`` (OpenCLIP ViT-H/14, width 1280, 32 layers, 1024-d embeddings) and
``sdxl_models/image_encoder/model.safetensors`` (ViT-bigG/14, width 1664, 48 layers, 1280-d): transformers'
``CLIPVisionModelWithProjection`` names (``vision_model.*``, ``visual_projection``). The transformer layers are the
text tower's (:class:`~vidsynth.models.text.CLIPEncoder`) without the causal mask.

``preprocess`` is CLIPImageProcessor's: shortest side to 224 (PIL bicubic), centre crop, /255, CLIP mean/std.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import CheckpointError, ConfigError
from .text import CLIPEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"


@dataclass(frozen=True)
class VisionEncoderConfig:
    width: int
    layers: int
    patch_size: int
    image_size: int
    projection_dim: int | None
    mlp_width: int
    # Invisible in shapes: both released encoders (OpenCLIP ViT-H/14 and ViT-bigG/14) use 16 heads and GELU.
    heads: int = 16
    activation: str = "gelu"

    @property
    def hidden_mlp(self) -> int:
        return self.mlp_width

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]]) -> "VisionEncoderConfig":
        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"CLIP vision weights lack {key!r}; the file is incomplete or not a CLIP image "
                                      "encoder")
            return tuple(getattr(shapes[key], "shape", shapes[key]))

        width, _, patch, _ = shape(PATCH_KEY)
        positions = shape("vision_model.embeddings.position_embedding.weight")[0]
        side = math.isqrt(positions - 1)
        if side * side != positions - 1:
            raise CheckpointError(f"CLIP vision position table of {positions} rows is not a square grid + CLS")
        layers = len({k.split(".")[3] for k in shapes if k.startswith("vision_model.encoder.layers.")})
        projection = shape("visual_projection.weight")[0] if "visual_projection.weight" in shapes else None
        return cls(width, layers, patch, side * patch, projection,
                   shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0])


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(config.width) * 0.02)
        self.patch_embedding = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_positions, config.width)
        # in the released files (a persistent buffer in transformers < 4.31); positions are always 0..n-1
        self.register_buffer("position_ids", torch.arange(config.num_positions).unsqueeze(0), persistent=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width)  # sic: the files' spelling
        self.encoder = CLIPEncoder(config, causal=False)
        self.post_layernorm = nn.LayerNorm(config.width)


class CLIPVisionModelWithProjection(nn.Module):
    """``forward(pixels) -> (image_embeds, penultimate)``: ``image_embeds`` = projection of the post-LayerNormed CLS
    token (what IP-Adapter consumes), ``penultimate`` = hidden states of the second-to-last layer, all tokens
    (transformers' ``hidden_states[-2]``, what the ``plus`` variants consume)."""

    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        if config.projection_dim:
            self.visual_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_model.embeddings.patch_embedding.weight.device

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ConfigError(f"the image encoder takes (n, 3, {size}, {size}) pixels, got {tuple(pixels.shape)}; "
                              "prepare images with vidsynth.models.vision.preprocess")
        model = self.vision_model
        x = model.pre_layrnorm(model.embeddings(pixels))
        layers = model.encoder.layers
        penultimate = x
        for i, layer in enumerate(layers):
            x = layer(x)
            if i == len(layers) - 2:
                penultimate = x
        pooled = model.post_layernorm(x[:, 0])
        embeds = self.visual_projection(pooled) if self.config.projection_dim else pooled
        return embeds, penultimate

    def encode(self, images: Sequence[Image.Image | np.ndarray | torch.Tensor]) -> torch.Tensor:
        """``image_embeds`` (n, projection_dim) of raw images (PIL, HWC uint8 arrays or CHW [0, 1] tensors)."""
        pixels = preprocess(images, self.config.image_size).to(self.device, self.dtype)
        return self(pixels)[0]


def _to_pil(image: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):  # CHW in [0, 1]
        image = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
        raise ConfigError(f"an image prompt must be a PIL image, an (h, w, 3) uint8 array or a (3, h, w) tensor in "
                          f"[0, 1]; got {getattr(image, 'dtype', type(image))} of shape {array.shape}")
    return Image.fromarray(array[..., :3])


def preprocess(images: Sequence[Image.Image | np.ndarray | torch.Tensor], size: int = 224) -> torch.Tensor:
    """CLIPImageProcessor's preparation: (n, 3, size, size) float32. The shortest side goes to ``size`` (bicubic, the
    long side truncated as transformers does), then a centre crop ``size`` x ``size``, /255 and CLIP mean/std."""
    if isinstance(images, (Image.Image, np.ndarray)) or isinstance(images, torch.Tensor) and images.ndim == 3:
        images = [images]
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for image in images:
        image = _to_pil(image)
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        image = image.resize((size, new_long) if w <= h else (new_long, size), resample=Image.BICUBIC)
        w, h = image.size
        top, left = (h - size) // 2, (w - size) // 2
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[:, top:top + size, left:left + size]
        out.append((pixels.float() / 255 - mean) / std)
    if not out:
        raise ConfigError("no images given to encode")
    return torch.stack(out)
