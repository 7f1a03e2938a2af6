"""Prompt travel: ``prompt={0: "...", 24: "...", 48: "..."}`` (and a dict ``negative_prompt``) becomes per-frame
conditioning, each keyframe's text embedding interpolated to the frames between (linear by default, as diffusers'
FreeNoise prompt interpolation; ``prompt_interpolation=`` takes diffusers' callback signature for others).

All keyframe texts are encoded in one batch, so texts of different lengths share one chunk count: a text needing
fewer 75-token chunks gets empty chunks (BOS, EOS, padding) appended, the web UIs' rule for prompts and negative
prompts of different lengths, so every frame's context has the same token count. For SDXL the context (both
encoders, concatenated) and ``y`` (pooled text + time ids; the ids are the same for every text) interpolate alike.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..errors import ConfigError
from .keyframes import Interpolation, check_keyframes, interpolate

Encode = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]
"""``encode(texts) -> (context (n, tokens, dim), y (n, adm) or None)``, one row per text."""


def is_travel(prompt, negative_prompt) -> bool:
    return isinstance(prompt, Mapping) or isinstance(negative_prompt, Mapping)


def keyframes(prompt: str | Mapping[int, str], num_frames: int, what: str) -> dict[int, str]:
    if isinstance(prompt, str):
        return {0: prompt}
    if not isinstance(prompt, Mapping):
        raise ConfigError(f"{what} must be a string or a {{frame: text}} dict, got {type(prompt).__name__}")
    return check_keyframes(prompt, num_frames, what, str)


def per_frame_conditioning(encode: Encode, prompt: str | Mapping[int, str], negative_prompt: str | Mapping[int, str],
                           num_frames: int, use_cfg: bool, interpolation: Interpolation | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(context (n_cond, num_frames, tokens, dim), y (n_cond, num_frames, adm) or None)``; n_cond = 2 under CFG
    (0 = negative, 1 = positive), else 1 (the negative prompt is then unused)."""
    tracks = [keyframes(negative_prompt, num_frames, "negative_prompt")] if use_cfg else []
    tracks.append(keyframes(prompt, num_frames, "prompt"))
    texts = list(dict.fromkeys(text for track in tracks for text in track.values()))
    context, y = encode(texts)
    row = {text: i for i, text in enumerate(texts)}
    contexts, ys = [], []
    for track in tracks:
        index = torch.tensor([row[text] for text in track.values()], device=context.device)
        contexts.append(interpolate(list(track), context[index], num_frames, interpolation))
        if y is not None:
            ys.append(interpolate(list(track), y[index], num_frames, interpolation))
    return torch.stack(contexts), (torch.stack(ys) if y is not None else None)
