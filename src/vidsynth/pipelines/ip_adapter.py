"""Conditioning-stage piece for image prompts (IP-Adapter).

Call arguments (DiffSynth's names, diffusers' alias): ``ipadapter_images=[image, ...]`` (or ``ip_adapter_image=``),
``ipadapter_scale=1.0``, and for SDXL ``ipadapter_use_instant_style=False``. The images' CLIP embeddings become
``num_tokens`` context tokens each, appended to the text context on the token axis; the negative clip gets zero
embeddings through the projection (diffusers, DiffSynth). For the call, the adapter is attached to the UNet's
cross-attentions (run-time hooks, taken off afterwards); ControlNet-style providers still see the text tokens only,
as in diffusers.

InstantStyle (DiffSynth ``SDXLIpAdapter.set_less_adapter``: adapter modules 34..43 of its 70, the ten transformer
blocks of diffusers' ``up_blocks.0.attentions.1``, the "style" block of the InstantStyle paper): the image acts there
only, elsewhere its scale is 0.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..ip_adapter import attach_ip_adapter, check_fits, check_image_encoder, cross_attention_sites

STYLE_BLOCK = "up_blocks.0.attentions.1"


@dataclass(frozen=True)
class ImagePrompt:
    images: tuple
    scale: float = 1.0
    instant_style: bool = False


def parse_image_prompt(options: dict) -> ImagePrompt | None:
    """Pop the image-prompt arguments from a call's ``options``; None when no image is given."""
    images = options.pop("ipadapter_images", None)
    alias = options.pop("ip_adapter_image", None)
    scale = options.pop("ipadapter_scale", 1.0)
    instant = options.pop("ipadapter_use_instant_style", False)
    if images is not None and alias is not None:
        raise ConfigError("give the image prompt once: ipadapter_images (DiffSynth) or ip_adapter_image (diffusers)")
    images = images if images is not None else alias
    if images is None:
        return None
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ConfigError("ipadapter_images is empty; pass at least one image or leave it out")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"ipadapter_scale must be a finite number (0 turns the image prompt off), got {scale!r}")
    return ImagePrompt(tuple(images), float(scale), bool(instant))


def check_image_prompt(prompt: ImagePrompt, unet, adapter, encoder) -> None:
    """Refuse before any compute: adapter and encoder loaded, fitting the UNet and each other."""
    missing = [name for name, m in (("an IP-Adapter (ip-adapter_sd15.bin / ip-adapter_sdxl.bin)", adapter),
                                    ("its image encoder (image_encoder/model.safetensors)", encoder)) if m is None]
    if missing:
        raise ConfigError(f"ipadapter_images needs {' and '.join(missing)} in the ModelManager; load_models([...]) "
                          "them before building the pipeline")
    check_fits(unet, adapter)
    check_image_encoder(adapter.config, encoder.config)
    if prompt.instant_style and unet.config.family != "sdxl":
        raise ConfigError("ipadapter_use_instant_style is an SDXL option (its style block is SDXL's "
                          f"{STYLE_BLOCK}); leave it False for SD 1.5")


def site_scales(unet, prompt: ImagePrompt) -> float | tuple[float, ...]:
    """One scale for every cross-attention, or with InstantStyle the scale in the style block and 0 elsewhere."""
    if not prompt.instant_style:
        return prompt.scale
    from ..lora import unet_block_map
    style = unet_block_map(unet.config)[STYLE_BLOCK] + "."
    return tuple(prompt.scale if site.startswith(style) else 0.0 for site in cross_attention_sites(unet))


def image_tokens(prompt: ImagePrompt, adapter, encoder, n_cond: int) -> torch.Tensor:
    """(n_cond, n_images * num_tokens, dim): the negative clip's zero-embedding tokens first under CFG."""
    embeds = encoder.encode(list(prompt.images))
    positive = adapter.image_tokens(embeds)
    if n_cond == 1:
        return positive
    return torch.cat([adapter.negative_tokens(embeds), positive])


def check_call(pipe, prompt: ImagePrompt | None) -> None:
    if prompt is not None:
        check_image_prompt(prompt, pipe.unet, getattr(pipe, "ip_adapter", None), getattr(pipe, "image_encoder", None))


def num_image_tokens(pipe, prompt: ImagePrompt) -> int:
    return len(prompt.images) * pipe.ip_adapter.config.num_tokens


def with_image_tokens(pipe, prompt: ImagePrompt | None, cond):
    """The conditioning stage's image part: the text conditioning with the image tokens appended."""
    if prompt is None:
        return cond
    return cond.with_tokens(image_tokens(prompt, pipe.ip_adapter, pipe.image_encoder, cond.n_cond))


def text_only(pipe, prompt: ImagePrompt | None, providers: list) -> list:
    if prompt is None:
        return providers
    return [TextOnlyProvider(p, num_image_tokens(pipe, prompt)) for p in providers]


def applied(pipe, prompt: ImagePrompt | None):
    """For the denoising of one call: the adapter on the UNet (nothing without an image prompt)."""
    if prompt is None:
        return nullcontext()
    return attached(prompt, pipe.unet, pipe.ip_adapter, num_image_tokens(pipe, prompt))


class TextOnlyProvider:
    """A control residual provider (ControlNet, SparseCtrl) fed the text tokens only, as diffusers feeds them."""

    def __init__(self, provider, num_image_tokens: int):
        self.provider, self.num_image_tokens = provider, num_image_tokens

    def residuals(self, x, t, context, y, frames, step):
        return self.provider.residuals(x, t, context[:, :-self.num_image_tokens], y, frames, step)


@contextmanager
def attached(prompt: ImagePrompt, unet, adapter, num_image_tokens: int):
    """The adapter on the UNet for one call, at the prompt's scale(s); taken off afterwards, also on errors."""
    handle = attach_ip_adapter(unet, adapter, site_scales(unet, prompt))
    handle.num_image_tokens = num_image_tokens
    try:
        yield handle
    finally:
        handle.remove()

