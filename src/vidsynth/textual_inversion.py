"""Textual-inversion embeddings: a word in the prompt that stands for learned token vectors.

Formats: AUTOMATIC1111 ``.pt`` (``string_to_param: {"*": (n, 768)}``), kohya ``.safetensors`` (``emb_params`` for
SD 1.5; ``clip_l`` + ``clip_g`` for SDXL), diffusers ``learned_embeds`` (one tensor keyed by its token). The word is
the file name without its extension (as A1111 and DiffSynth name it) unless ``token=`` says otherwise; it expands to
its n vectors wherever it stands in a prompt or negative prompt.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoints import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, Checkpoint
from .errors import CheckpointError, ConfigError

EMBEDDING_SUFFIXES = (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES)


def read_embedding(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """(the file's own token name, vectors per text encoder): ``{"clip_l": ..., "clip_g": ...}`` for SDXL files,
    ``{"": (n, width)}`` for single-encoder ones."""
    ckpt = Checkpoint(path)
    keys = set(ckpt.keys())
    stem = Path(path).stem

    def vectors(key: str) -> torch.Tensor:
        t = ckpt.tensor(key, torch.float32)
        if t.ndim == 1:  # a single vector saved without its row axis
            t = t[None]
        if t.ndim != 2 or t.shape[0] == 0:
            raise CheckpointError(f"{ckpt.path}: embedding {key!r} has shape {tuple(t.shape)}, expected (vectors, "
                                  "width)")
        return t

    if {"clip_l", "clip_g"} <= keys:
        found = {"clip_l": vectors("clip_l"), "clip_g": vectors("clip_g")}
        if found["clip_l"].shape[0] != found["clip_g"].shape[0]:
            raise CheckpointError(f"{ckpt.path}: clip_l and clip_g hold different vector counts")
        return stem, found
    for key in ("string_to_param.*", "emb_params"):
        if key in keys:
            return stem, {"": vectors(key)}
    if len(keys) == 1:  # diffusers' learned_embeds.bin: {token: vectors}
        (key,) = keys
        return key, {"": vectors(key)}
    raise CheckpointError(f"{ckpt.path}: not a textual-inversion embedding (expected 'string_to_param', 'emb_params', "
                          f"'clip_l'/'clip_g' or a single tensor; found {', '.join(sorted(keys)[:6])})")


def attach_embedding(tokenizers, encoders, path: str | os.PathLike, token: str | None = None) -> str:
    """Register the embedding of ``path`` with the pipeline's tokenizers (one per text encoder, in order); returns the
    word that now stands for it."""
    name, found = read_embedding(path)
    word = token or name
    widths = [e.config.width for e in encoders]
    if len(encoders) == 2:
        if set(found) != {"clip_l", "clip_g"}:
            raise ConfigError(f"{path}: a single-encoder (SD 1.5) embedding cannot be used with SDXL, which needs "
                              "clip_l and clip_g vectors; use an SDXL embedding")
        parts = [found["clip_l"], found["clip_g"]]
    else:
        if "" not in found:
            raise ConfigError(f"{path}: an SDXL embedding (clip_l + clip_g) cannot be used with SD 1.5; use an SD 1.5 "
                              "embedding")
        parts = [found[""]]
    for vectors, width in zip(parts, widths):
        if vectors.shape[1] != width:
            raise ConfigError(f"{path}: embedding width {vectors.shape[1]} does not fit the text encoder's {width} "
                              "(an embedding for another model family?)")
    for tokenizer, vectors in zip(tokenizers, parts):
        tokenizer.add_embedding(word, vectors)
    return word


def embedding_files(paths) -> list[Path]:
    """The embedding files named by ``paths``: files as they are, folders by their files with embedding suffixes."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in EMBEDDING_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such embedding file or folder")
    return files


class Prompter:
    """DiffSynth's ``pipe.prompter``: ``load_textual_inversions([...])`` takes files or folders."""

    def __init__(self, pipe):
        self.pipe = pipe

    def load_textual_inversions(self, paths) -> list[str]:
        return [self.pipe.load_textual_inversion(f) for f in embedding_files(paths)]
