"""SDXL text-to-video: CLIP-L + OpenCLIP bigG conditioning, pooled text and size/crop ids, on the shared core."""
from __future__ import annotations

import torch

from ..models.layers import timestep_embedding
from ..models.text import encode_chunks
from ..tokenizer import CLIPTokenizer
from .conditioning import Conditioning
from .core import VideoPipeline


class SDXLVideoPipeline(VideoPipeline):
    family = "sdxl"
    default_size = 1024
    conditioning_options = ("original_size", "crops_coords_top_left", "target_size")

    @classmethod
    def required_models(cls) -> tuple[str, ...]:
        return ("unet", "vae", "text_encoder", "text_encoder_2")

    @staticmethod
    def make_tokenizers() -> list:
        return [CLIPTokenizer(), CLIPTokenizer(pad_id=0)]  # bigG's tokenizer pads with "!" (id 0)

    def encode_prompts(self, prompts: list[str], *, clip_skip: int, height: int, width: int,
                       original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                       target_size: tuple[int, int] | None = None) -> Conditioning:
        # both encoders: hidden state of layer -(clip_skip + 1) without the final norm (SDXL's "penultimate" at 1);
        # the two tokenizers share one vocabulary, so their chunk counts agree
        hiddens, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer.chunks(prompts).to(self.device)
            hidden, pooled = encode_chunks(encoder, ids, hidden_layer=-(clip_skip + 1), final_norm=False,
                                           extra_embeddings=tokenizer.extra_embeddings)
            hiddens.append(hidden)
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        ids = torch.tensor([*original_size, *crops_coords_top_left, *target_size], device=self.device)
        # each of the six ids gets a sinusoidal embedding; SDXL base gives them 256 channels each (2816 = 1280 + 6*256)
        per_id = (self.unet.config.adm_in_channels - pooled.shape[-1]) // 6
        time_embeds = timestep_embedding(ids, per_id).reshape(1, -1).expand(len(prompts), -1)
        y = torch.cat([pooled.float(), time_embeds], dim=-1)
        return Conditioning(context=torch.cat(hiddens, dim=-1).to(self.dtype), y=y.to(self.dtype))
