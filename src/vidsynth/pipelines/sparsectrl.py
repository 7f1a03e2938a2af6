"""Conditioning-stage piece for SparseCtrl keyframes: a control residual provider.

Call arguments: ``sparsectrl_images=[image, ...]`` at ``sparsectrl_frame_indices=[i, ...]`` (one index per image,
negative ones counted from the end, as the original's ``controlnet_image_indexs``; default 0, 1, ...) and
``sparsectrl_scale=1.0`` (the original's ``controlnet_conditioning_scale``). diffusers' AnimateDiffSparseControlNet
names ``conditioning_frames`` / ``controlnet_frame_indices`` / ``controlnet_conditioning_scale`` are accepted too when
a SparseCtrl model is loaded (the last only without ControlNets, whose argument it is then).

As in guoyww/AnimateDiff's pipeline: the keyframes go to their frames of an otherwise zero condition video with a
mask that is 1 on them; RGB keyframes are VAE-encoded first (a posterior sample of ``2 * image - 1``, times the
latent scale), scribbles stay images in [0, 1]. Both classifier-free-guidance clips get the same condition. With
context windows each window takes the condition frames (and mask) of the frames it covers, so a keyframe acts in
every window that contains it, and its motion modules see the window's frames only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .frames import frames_tensor
from .initial import encode_frames


@dataclass(frozen=True)
class Keyframes:
    images: tuple
    indices: tuple[int, ...]
    scale: float = 1.0


def pop_keyframes(options: dict, sparsectrl_loaded: bool) -> dict:
    """The SparseCtrl arguments popped from a call's ``options`` (checked by :func:`parse_keyframes`). diffusers'
    names are read only when a SparseCtrl model is loaded (its ControlNet pipeline uses ``conditioning_frames`` too),
    and ``controlnet_conditioning_scale`` only when no ControlNet took it first (the core asks the ControlNets
    first)."""
    aliases = (("conditioning_frames", "controlnet_frame_indices", "controlnet_conditioning_scale")
               if sparsectrl_loaded else (None, None, None))
    return {"images": _one_of(options, "sparsectrl_images", aliases[0]),
            "indices": _one_of(options, "sparsectrl_frame_indices", aliases[1]),
            "scale": _one_of(options, "sparsectrl_scale", aliases[2])}


def parse_keyframes(raw: dict, num_frames: int, model=None) -> Keyframes | None:
    """The call's keyframes (None without), checked against the video length and the loaded SparseCtrl model
    before any compute."""
    images, indices, scale = raw["images"], raw["indices"], raw["scale"]
    if images is None:
        if indices is not None or scale is not None:
            raise ConfigError("sparsectrl_frame_indices / sparsectrl_scale given without sparsectrl_images (the "
                              "keyframes)")
        return None
    if model is None:
        raise ConfigError("sparsectrl_images needs a SparseCtrl model in the ModelManager; load_models([... "
                          "v3_sd15_sparsectrl_rgb.ckpt or v3_sd15_sparsectrl_scribble.ckpt]) before building the "
                          "pipeline")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    indices = list(range(len(images))) if indices is None else list(indices)
    if len(indices) != len(images) or not images:
        raise ConfigError(f"{len(images)} SparseCtrl keyframe(s) but {len(indices)} frame index(es); give one index "
                          "per keyframe")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not -num_frames <= i < num_frames]
    if bad:
        raise ConfigError(f"SparseCtrl keyframe indices {bad} lie outside the {num_frames}-frame video; use 0.."
                          f"{num_frames - 1} (or -{num_frames}..-1 counted from the end)")
    resolved = [i % num_frames for i in indices]
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"SparseCtrl keyframe indices {indices} name one frame twice")
    scale = 1.0 if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ConfigError(f"sparsectrl_scale must be a number, got {scale!r}")
    return Keyframes(tuple(images), tuple(resolved), float(scale))


def _one_of(options: dict, name: str, alias: str | None):
    value, other = options.pop(name, None), options.pop(alias, None) if alias else None
    if value is not None and other is not None:
        raise ConfigError(f"give {name} or its alias {alias}, not both")
    return value if value is not None else other


class SparseCtrlProvider:
    """Residuals of one SparseCtrl model for each window: ``residuals(x, t, context, y, frames, step)``."""

    def __init__(self, model, condition: torch.Tensor, mask: torch.Tensor, scale: float):
        self.model, self.condition, self.mask, self.scale = model, condition, mask, scale

    def residuals(self, x, t, context, y, frames, step):
        n = len(frames)
        clips = x.shape[0] // n
        index = torch.as_tensor(frames, device=self.condition.device)
        condition = self.condition[index].repeat(clips, 1, 1, 1)
        mask = self.mask[index].repeat(clips, 1, 1, 1)
        return self.model(x, condition, mask, t, context, n, self.scale)


def providers(pipe, request) -> list:
    """The call's SparseCtrl provider, or none without keyframes."""
    if request.keyframes is None:
        return []
    return [sparsectrl_provider(pipe.sparsectrl, pipe.vae, request.keyframes, num_frames=request.num_frames,
                                height=request.height, width=request.width, generator=request.generator,
                                device=pipe.device)]


def sparsectrl_provider(model, vae, keyframes: Keyframes, *, num_frames: int, height: int, width: int,
                        generator: torch.Generator | None, device: torch.device) -> SparseCtrlProvider:
    """The provider for one call: keyframes prepared (VAE-encoded for RGB) into a (num_frames, c, ...) condition."""
    pixels = frames_tensor(list(keyframes.images), height, width, name="sparsectrl_images")  # [-1, 1]
    if model.sparse_config.simplified:
        # a generator of its own, so the keyframes' posterior sample leaves the call's noise draws as they are
        own = None if generator is None else torch.Generator(generator.device).manual_seed(generator.initial_seed() + 1)
        images = encode_frames(vae, pixels, own)
    else:
        images = (pixels + 1) / 2
    condition = torch.zeros((num_frames, *images.shape[1:]), dtype=torch.float32)
    mask = torch.zeros((num_frames, 1, *images.shape[2:]), dtype=torch.float32)
    condition[list(keyframes.indices)] = images.float().cpu()
    mask[list(keyframes.indices)] = 1
    return SparseCtrlProvider(model, condition.to(device), mask.to(device), keyframes.scale)
