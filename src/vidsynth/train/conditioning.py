"""Captions -> the UNet's conditioning during training: SD 1.5 text context, or SDXL's two encoders plus ``y``.

SD 1.5: CLIP-L last hidden state after the final norm. SDXL: CLIP-L and bigG penultimate hidden states (no final
norm) concatenated; ``y`` = bigG pooled + the six Fourier-embedded size/crop ids, here original size = target size =
the training size and crop (0, 0) (every training clip is resized and centre-cropped to that size).

With ``cache=True`` every caption is encoded once (:meth:`prefill`) and kept on the CPU; the text encoders can then
leave the accelerator. A batch of cached captions of different chunk counts is padded with the empty caption's
encoding, which is what encoding them together gives (each 77-token chunk is encoded on its own and an empty chunk
is the empty caption), so cached and uncached runs are the same computation.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..models.layers import timestep_embedding
from ..models.text import encode_chunks
from ..tokenizer import CLIPTokenizer


class TextConditioner:
    def __init__(self, encoders: list[nn.Module], tokenizers: list[CLIPTokenizer], *, adm_channels: int | None,
                 size: tuple[int, int], device: torch.device, cache: bool = False):
        self.encoders, self.tokenizers, self.adm_channels = encoders, tokenizers, adm_channels
        self.size, self.device = tuple(size), device
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = {} if cache else None

    @property
    def sdxl(self) -> bool:
        return self.adm_channels is not None

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # ids go where the encoder is: with the cache it may have left the accelerator (held-out captions)
        def encode(tokenizer, encoder, **kwargs):
            ids = tokenizer.chunks(captions).to(next(encoder.parameters()).device)
            return [t.to(self.device) for t in encode_chunks(encoder, ids, **kwargs)]

        if not self.sdxl:
            return encode(self.tokenizers[0], self.encoders[0])[0], None
        hiddens, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            hidden, pooled = encode(tokenizer, encoder, hidden_layer=-2, final_norm=False)
            hiddens.append(hidden)
        h, w = self.size
        ids = torch.tensor([h, w, 0, 0, h, w], device=self.device)
        per_id = (self.adm_channels - pooled.shape[-1]) // 6
        time_ids = timestep_embedding(ids, per_id).reshape(1, -1).expand(len(captions), -1)
        return torch.cat(hiddens, dim=-1), torch.cat([pooled.float(), time_ids], dim=-1)

    def prefill(self, captions: Iterable[str]) -> int:
        """Encode the captions not cached yet (and the empty one, for caption dropout and padding)."""
        todo = sorted({"", *captions} - set(self.cache))
        for caption in todo:  # one at a time: each keeps its own chunk count, no padding stored
            context, y = self._encode([caption])
            self.cache[caption] = (context[0].cpu(), None if y is None else y[0].cpu())
        return len(todo)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``context (b, tokens, dim)`` and ``y (b, adm)`` or None."""
        if self.cache is None:
            return self._encode(captions)
        self.prefill(captions)
        contexts = [self.cache[c][0] for c in captions]
        tokens = max(c.shape[0] for c in contexts)
        empty = self.cache[""][0]
        contexts = [torch.cat([c, *[empty] * ((tokens - c.shape[0]) // empty.shape[0])]) for c in contexts]
        context = torch.stack(contexts).to(self.device)
        y = torch.stack([self.cache[c][1] for c in captions]).to(self.device) if self.sdxl else None
        return context, y
