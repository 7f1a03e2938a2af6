"""SD 1.5 text-to-video: CLIP-L conditioning on the shared video core."""
from __future__ import annotations

from ..models.text import encode_chunks
from ..tokenizer import CLIPTokenizer
from .conditioning import Conditioning
from .core import VideoPipeline


class SDVideoPipeline(VideoPipeline):
    family = "sd15"

    @staticmethod
    def make_tokenizers() -> list:
        return [CLIPTokenizer()]

    def encode_prompts(self, prompts: list[str], *, clip_skip: int, height: int, width: int) -> Conditioning:
        ids = self.tokenizers[0].chunks(prompts).to(self.device)
        hidden, _ = encode_chunks(self.text_encoders[0], ids, hidden_layer=-clip_skip, final_norm=True,
                                  extra_embeddings=self.tokenizers[0].extra_embeddings)
        return Conditioning(context=hidden.to(self.dtype))
