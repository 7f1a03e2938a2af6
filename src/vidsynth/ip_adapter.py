"""IP-Adapter (tencent-ailab/IP-Adapter): an image prompt as extra cross-attention tokens.

Files: ``ip-adapter_sd15.bin`` / ``ip-adapter_sdxl.bin`` (``{"image_proj": ..., "ip_adapter": ...}``, flattened by the
checkpoint reader to ``image_proj.*`` / ``ip_adapter.*``, the keys of their ``.safetensors`` twins). The module's
attribute names are those keys:

- ``image_proj`` (ImageProjModel): ``proj`` Linear(image_embeds -> num_tokens x cross_dim), reshape, ``norm``
  LayerNorm: the CLIP image embedding becomes ``num_tokens`` (4) context tokens;
- ``ip_adapter.<i>.to_k_ip`` / ``to_v_ip``: the decoupled cross-attention's key/value projections of image tokens. ``i``
  is the position in diffusers' ``UNet2DConditionModel.attn_processors`` (down blocks, up blocks, mid block; attn1 then
  attn2 of each transformer block), so the cross-attentions are the odd ones, 1, 3, 5...; the original's
  ``adapter_modules = ModuleList(unet.attn_processors.values())`` numbers them so, and diffusers' loader reads
  ``f"{key_id}.to_k_ip.weight"`` with ``key_id = 1, 3, ...`` over the cross-attention processors.

At run time (:func:`attach_ip_adapter`), each UNet ``attn2`` gets ``+ scale * softmax(q k_ip^T / sqrt(d)) v_ip`` (through
``to_out``) over the image tokens, which travel appended to the text context on the token axis and are split off there.
Like a run-time LoRA: hooks only, the UNet's weights are untouched, ``scale`` changes without reloading, ``remove()``
restores the UNet; scale 0 splits the tokens off and adds nothing (bit-identical to no adapter).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError
from .models.layers import attention

ADAPTER_KEY = re.compile(r"ip_adapter\.(\d+)\.to_k_ip\.weight")


@dataclass(frozen=True)
class IPAdapterConfig:
    image_dim: int               # CLIP image_embeds width the projection takes (1024 ViT-H, 1280 ViT-bigG)
    cross_dim: int               # the UNet's context width (768 SD 1.5, 2048 SDXL)
    num_tokens: int              # image tokens per image (4)
    channels: tuple[int, ...]    # width of each attn2 the adapter serves, in diffusers' processor order

    @property
    def family(self) -> str | None:
        return {768: "sd15", 2048: "sdxl"}.get(self.cross_dim)

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]], path: str = "the IP-Adapter") -> "IPAdapterConfig":
        shape = lambda key: tuple(getattr(shapes[key], "shape", shapes[key]))  # noqa: E731
        if "image_proj.proj.weight" not in shapes or "image_proj.norm.weight" not in shapes:
            variant = "plus (Resampler)" if "image_proj.latents" in shapes else \
                "full-face / FaceID" if any(k.startswith(("image_proj.proj.0", "image_proj.proj.3",
                                                          "image_proj.perceiver_resampler")) for k in shapes) else None
            what = f"an IP-Adapter {variant} variant" if variant else "an IP-Adapter of an unknown image projection"
            raise CheckpointError(f"{path}: {what}, not supported yet; the plain IP-Adapter (ip-adapter_sd15, "
                                  "ip-adapter_sdxl: image_proj.proj + image_proj.norm) is")
        out, image_dim = shape("image_proj.proj.weight")
        cross_dim = shape("image_proj.norm.weight")[0]
        if out % cross_dim:
            raise CheckpointError(f"{path}: image_proj.proj gives {out} values, not a whole number of {cross_dim}-wide "
                                  "tokens")
        indices = sorted(int(m[1]) for k in shapes if (m := ADAPTER_KEY.fullmatch(k)))
        if not indices or indices != list(range(1, 2 * len(indices), 2)):
            raise CheckpointError(f"{path}: ip_adapter.<i>.to_k_ip keys should be numbered 1, 3, 5, ...; found "
                                  f"{indices[:8]}")
        for i in indices:
            if shape(f"ip_adapter.{i}.to_k_ip.weight")[1] != cross_dim:
                raise CheckpointError(f"{path}: ip_adapter.{i}.to_k_ip takes {shape(f'ip_adapter.{i}.to_k_ip.weight')[1]}"
                                      f"-wide tokens, the projection makes {cross_dim}")
        return cls(image_dim, cross_dim, out // cross_dim,
                   tuple(shape(f"ip_adapter.{i}.to_k_ip.weight")[0] for i in indices))


class ImageProjModel(nn.Module):
    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.num_tokens, self.cross_dim = config.num_tokens, config.cross_dim
        self.proj = nn.Linear(config.image_dim, config.num_tokens * config.cross_dim)
        self.norm = nn.LayerNorm(config.cross_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(n, image_dim) -> (n, num_tokens, cross_dim)"""
        return self.norm(self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_dim))


class IPAttention(nn.Module):
    def __init__(self, cross_dim: int, channels: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, channels, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, channels, bias=False)


class IPAdapter(nn.Module):
    """The adapter's weights (``image_proj``, ``ip_adapter.<odd i>``); :func:`attach_ip_adapter` puts it to work."""

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = config
        self.image_proj = ImageProjModel(config)
        self.ip_adapter = nn.ModuleDict({str(2 * m + 1): IPAttention(config.cross_dim, c)
                                         for m, c in enumerate(config.channels)})

    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Context tokens of a list of images: (n_images, image_dim) -> (1, n_images * num_tokens, cross_dim), the
        images' tokens one after another (as diffusers and DiffSynth pass several images to one adapter)."""
        if image_embeds.ndim != 2 or image_embeds.shape[-1] != self.config.image_dim:
            raise ConfigError(f"the IP-Adapter takes ({self.config.image_dim},)-wide image embeddings, got "
                              f"{tuple(image_embeds.shape)}; use the image encoder that belongs to it")
        weight = self.image_proj.proj.weight
        return self.image_proj(image_embeds.to(weight.device, weight.dtype)).reshape(1, -1, self.config.cross_dim)

    def negative_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The unconditional branch: zero image embeddings through the projection (diffusers, DiffSynth)."""
        return self.image_tokens(torch.zeros_like(image_embeds))


def cross_attention_sites(unet) -> list[str]:
    """The UNet's cross-attention (``attn2``) module names in LDM layout, in diffusers' ``attn_processors`` order
    (down blocks, up blocks, mid block), which is the order of the adapter's odd indices."""
    from .lora import unet_block_map

    config = unet.config
    levels, nrb = len(config.channel_mult), config.num_res_blocks
    blocks = unet_block_map(config)
    order = [f"down_blocks.{i}.attentions.{j}" for i in range(levels) for j in range(nrb)]
    order += [f"up_blocks.{i}.attentions.{j}" for i in range(levels) for j in range(nrb + 1)]
    order.append("mid_block.attentions.0")
    sites = []
    for name in filter(blocks.__contains__, order):
        transformer = unet.get_submodule(blocks[name])
        sites += [f"{blocks[name]}.transformer_blocks.{k}.attn2" for k in range(len(transformer.transformer_blocks))]
    return sites


class _IPSite:
    """Hooks on one ``attn2``: the pre-hook splits the image tokens off the context, the forward hook adds their
    attention (``to_out`` without its bias, which the text attention already carried)."""

    def __init__(self, handle: "IPAdapterHandle", module: nn.Module, weights: IPAttention, index: int):
        self.handle, self.module, self.weights, self.index = handle, module, weights, index
        self.image: torch.Tensor | None = None
        self.hooks = [module.register_forward_pre_hook(self._split), module.register_forward_hook(self._add)]

    def _split(self, module: nn.Module, args: tuple):
        x, context = args[0], args[1]
        n = self.handle.num_image_tokens
        if context.shape[1] <= n:
            raise ConfigError(f"the context has {context.shape[1]} tokens, not text followed by {n} image tokens; the "
                              "IP-Adapter needs its image tokens appended (the pipeline does this)")
        self.image = context[:, -n:]
        return (x, context[:, :-n], *args[2:])

    def _add(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        image, self.image = self.image, None
        scale = self.handle.scale_of(self.index)
        if scale == 0:
            return output
        q = module.to_q(args[0])
        k, v = self.weights.to_k_ip(image), self.weights.to_v_ip(image)
        b, n, inner = q.shape
        if k.shape[0] == 1 and b != 1:  # one set of image tokens for the whole batch
            k, v = (t.expand(b, -1, -1) for t in (k, v))
        elif k.shape[0] != b:  # one context per clip (the UNet's per-clip K/V): the clip's frames attend as one query
            q = q.reshape(k.shape[0], -1, inner)
        extra = attention(q, k, v, module.heads).reshape(b, n, inner)
        return output + scale * F.linear(extra, module.to_out[0].weight)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


class IPAdapterHandle:
    """An IP-Adapter attached to a UNet. ``scale``: one number, or one per cross-attention site (``site_scales``);
    ``num_image_tokens``: how many trailing context tokens are image tokens (images x tokens per image)."""

    def __init__(self, unet, adapter: IPAdapter, scale: float | Sequence[float] = 1.0):
        self.unet, self.adapter = unet, adapter
        self.sites_names = check_fits(unet, adapter)
        self.num_image_tokens = adapter.config.num_tokens
        self.scale = scale
        self._sites = [_IPSite(self, unet.get_submodule(name), adapter.ip_adapter[str(2 * m + 1)], m)
                       for m, name in enumerate(self.sites_names)]
        self.removed = False

    @property
    def scale(self) -> float | tuple[float, ...]:
        return self._scale

    @scale.setter
    def scale(self, value: float | Sequence[float]) -> None:
        if not isinstance(value, (int, float)):
            value = tuple(float(v) for v in value)
            if len(value) != len(self.sites_names):
                raise ConfigError(f"{len(value)} IP-Adapter scales for {len(self.sites_names)} cross-attention sites")
        self._scale = value

    def scale_of(self, index: int) -> float:
        return float(self._scale) if isinstance(self._scale, (int, float)) else self._scale[index]

    def remove(self) -> None:
        if not self.removed:
            for site in self._sites:
                site.remove()
            self.removed = True

    def __enter__(self) -> "IPAdapterHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def check_base(config: IPAdapterConfig, unet_config, path: str = "the IP-Adapter") -> None:
    """An adapter for another base (SD 1.5 vs SDXL: the context width tells) is refused."""
    if config.cross_dim != unet_config.context_dim:
        fam = {"sd15": "SD 1.5", "sdxl": "SDXL"}
        made_for = fam.get(config.family, "another base model")
        raise ConfigError(f"{path}: an IP-Adapter for {made_for} ({config.cross_dim}-wide tokens) cannot drive this {fam.get(unet_config.family, unet_config.family)} UNet "
                          f"(context width {unet_config.context_dim}); use the adapter made for the base model "
                          "(ip-adapter_sd15 for SD 1.5, ip-adapter_sdxl for SDXL)")


def check_fits(unet, adapter: IPAdapter, path: str = "the IP-Adapter") -> list[str]:
    """The UNet's cross-attention sites, after checking the adapter serves exactly these (else a ConfigError)."""
    config = adapter.config
    check_base(config, unet.config, path)
    sites = cross_attention_sites(unet)
    widths = tuple(unet.get_submodule(s).to_k.out_features for s in sites)
    if widths != config.channels:
        raise ConfigError(f"{path}: the adapter serves {len(config.channels)} cross-attention layers of widths "
                          f"{config.channels[:6]}..., this UNet has {len(sites)} of widths {widths[:6]}...")
    return sites


def attach_ip_adapter(unet, adapter: IPAdapter, scale: float | Sequence[float] = 1.0) -> IPAdapterHandle:
    """Put ``adapter`` on ``unet``'s cross-attentions at ``scale`` (run time; ``handle.remove()`` takes it off)."""
    return IPAdapterHandle(unet, adapter, scale)


def check_image_encoder(adapter_config: IPAdapterConfig, encoder_config, adapter_path="the IP-Adapter",
                        encoder_path="the image encoder") -> None:
    """An image encoder whose embedding width is not the adapter's projection input is refused."""
    if encoder_config.projection_dim != adapter_config.image_dim:
        raise ConfigError(f"{encoder_path} makes {encoder_config.projection_dim}-wide image embeddings, {adapter_path} "
                          f"projects {adapter_config.image_dim}-wide ones; use the matching encoder "
                          "(models/image_encoder (ViT-H, 1024) for ip-adapter_sd15, sdxl_models/image_encoder "
                          "(ViT-bigG, 1280) for ip-adapter_sdxl)")
