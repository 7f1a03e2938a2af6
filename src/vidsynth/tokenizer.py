"""CLIP byte-level BPE (the tokenizer of SD 1.5 and both SDXL text encoders) on the `tokenizers` library.

Gives the ids of ``transformers.CLIPTokenizer`` on the same vocab/merges; long prompts are split into 75-token
chunks as the Stable Diffusion web UIs do, never truncated.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import ConfigError

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
# OpenAI CLIP's word split: contractions, runs of letters, single digits, runs of other non-space symbols.
_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _package_file(name: str) -> str:
    return str(resources.files("vidsynth") / "data" / name)


class CLIPTokenizer:
    """Text -> CLIP token ids. ``pad_id`` is 49407 (eos) for CLIP-L and 0 (``!``) for SDXL's OpenCLIP bigG."""

    bos_id = 49406
    eos_id = 49407

    def __init__(
        self,
        vocab_path: str | Path | None = None,
        merges_path: str | Path | None = None,
        pad_id: int = 49407,
        max_length: int = 77,
    ):
        if max_length < 3:
            raise ConfigError(f"max_length={max_length} leaves no room for tokens between bos and eos; use 77")
        vocab = str(vocab_path or _package_file("vocab.json"))
        merges = str(merges_path or _package_file("merges.txt"))
        tok = Tokenizer(BPE.from_file(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                                      unk_token=EOS_TOKEN, fuse_unk=False))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
        if tok.token_to_id(BOS_TOKEN) != self.bos_id or tok.token_to_id(EOS_TOKEN) != self.eos_id:
            raise ConfigError(f"{vocab} is not the CLIP vocabulary (bos/eos must be {self.bos_id}/{self.eos_id}); "
                              "omit vocab_path to use the bundled one")
        self._tokenizer = tok
        self.pad_id = pad_id
        self.max_length = max_length
        self.vocab_size = tok.get_vocab_size(with_added_tokens=False)
        self.extra_embeddings: torch.Tensor | None = None  # (n, width): vectors of ids vocab_size, vocab_size + 1, ...
        self._expansions: dict[int, list[int]] = {}  # added word's id -> the ids of its vectors

    def add_embedding(self, name: str, vectors: torch.Tensor) -> list[int]:
        """Let ``name`` (a whole word in prompts, any case) stand for the (n, width) ``vectors`` (textual inversion);
        returns the ids it expands to. Adding a name again replaces it."""
        word = name.lower()
        self._tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=True)])
        start = 0 if self.extra_embeddings is None else self.extra_embeddings.shape[0]
        if self.extra_embeddings is not None and self.extra_embeddings.shape[1] != vectors.shape[1]:
            raise ConfigError(f"embedding {name!r} has width {vectors.shape[1]}, the ones loaded before "
                              f"{self.extra_embeddings.shape[1]}; they are for different text encoders")
        ids = list(range(self.vocab_size + start, self.vocab_size + start + vectors.shape[0]))
        self.extra_embeddings = vectors if self.extra_embeddings is None else torch.cat([self.extra_embeddings, vectors])
        self._expansions[self._tokenizer.token_to_id(word)] = ids
        return ids

    def _expand(self, ids: list[int]) -> list[int]:
        if not self._expansions:
            return ids
        return [j for i in ids for j in self._expansions.get(i, [i])]

    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens per chunk (75 for a 77-long context)."""
        return self.max_length - 2

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos, never truncated."""
        return self._expand(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def chunks(self, texts: Sequence[str], min_chunks: int = 1) -> torch.LongTensor:
        """``(len(texts), k, max_length)`` ids: each text cut into ``chunk_tokens``-long pieces, each wrapped in
        bos..eos and padded with ``pad_id``; k is the most any text needs (at least ``min_chunks``), and shorter
        texts get empty chunks (bos, eos, pad...), so prompts and negative prompts batch together."""
        if isinstance(texts, str):
            raise ConfigError("chunks() takes a list of prompts; wrap a single prompt as [prompt]")
        encoded = [self._expand(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        step = self.chunk_tokens
        k = max([min_chunks, 1] + [math.ceil(len(ids) / step) for ids in encoded])
        out = torch.full((len(encoded), k, self.max_length), self.pad_id, dtype=torch.long)
        out[:, :, 0] = self.bos_id
        for i, ids in enumerate(encoded):
            for j in range(k):
                piece = ids[j * step:(j + 1) * step]
                out[i, j, 1:len(piece) + 1] = torch.tensor(piece, dtype=torch.long)
                out[i, j, len(piece) + 1] = self.eos_id
        return out
