"""Tiny random vidsynth models and their diffusers / transformers twins holding the same weights (fp32, CPU).

Ours are built in the original (single-file / AnimateDiff) layouts and randomised; the twins get the same tensors
through diffusers' own single-file converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_open_clip_checkpoint``, ``convert_animatediff_checkpoint_to_diffusers``); the Hugging Face CLIP layout is
ours as it is. ``tiny_sd15()`` / ``tiny_sdxl()`` give every part of a text-to-video pipeline at once.

Where the original models and diffusers disagree, the twin is patched to the original (``motion_unet``):
diffusers pools the motion modules' GroupNorm over frames, where v1/v2/v3 normalise each frame; and its resnets
normalise each frame, where v1 pools over the clip.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from vidsynth.manager import VAE_SCALING
from vidsynth.models.motion import MotionConfig, MotionModuleSet
from vidsynth.models.text import CLIPTextModel, OpenCLIPTextModel, TextEncoderConfig
from vidsynth.models.unet import PREFIX as UNET_PREFIX
from vidsynth.models.unet import UNetConfig, UNetModel
from vidsynth.models.vae import AutoencoderKL, VAEConfig

VAE_PREFIX, OPEN_CLIP_PREFIX = "first_stage_model.", "conditioner.embedders.1.model."
VOCAB = 49408  # the real CLIP vocabulary, so the real tokenizers' ids fit

# SD 1.5's shape (4 levels, attention on the first three, 8 heads) at 32-64 channels: every motion site exists.
SD15_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                       transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, context_dim=32, num_heads=8)
CLIP_L = TextEncoderConfig(VOCAB, width=32, layers=3, heads=2, max_positions=77, activation="quick_gelu",
                           projection_dim=None, layout="hf")
# SDXL's shape: 3 levels, no attention at level 0, linear projections, fixed channels per head (16 here, 64 there),
# deeper transformers further down; context = CLIP-L 32 + bigG 48 (768 + 1280); y = pooled 16 + 6 time ids x 8
# channels (1280 + 6 x 256).
BIG_G = TextEncoderConfig(VOCAB, width=48, layers=3, heads=3, max_positions=77, activation="gelu", projection_dim=16,
                          layout="open_clip")
SDXL_TIME_ID_DIM = 8
SDXL_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                       transformer_depth=(0, 1, 2), transformer_depth_middle=2, context_dim=CLIP_L.width + BIG_G.width,
                       num_head_channels=16, use_linear_in_transformer=True,
                       adm_in_channels=BIG_G.projection_dim + 6 * SDXL_TIME_ID_DIM)
# 8x downscale like the real VAE (the pipelines assume it), narrow.
VAE = VAEConfig(base_channels=16, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8)
# which versions have a mid-block module (v2 layout); the PE length is 24 for v1, 32 for the rest
HAS_MID = {"v1": False, "v2": True, "v3": False, "sdxl_beta": False, "animatelcm": True, "lightning": True}


def randomise(build: Callable[[], nn.Module], seed: int, spread: float = 0.1) -> nn.Module:
    """``build()`` under a fixed seed (default init for matrices and convolutions), then 1-D norm weights
    1 + N(0, spread^2) and biases N(0, spread^2), so a missed, swapped or doubled norm or bias shows."""
    torch.manual_seed(seed)
    model = build()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + spread * torch.randn_like(p))
    return model.eval()


# ---- ours --------------------------------------------------------------------------------------------------------

def tiny_unet(config: UNetConfig = SD15_UNET, seed: int = 0) -> UNetModel:
    return randomise(lambda: UNetModel(config), seed)


def tiny_vae(family: str = "sd15", seed: int = 1) -> AutoencoderKL:
    vae = randomise(lambda: AutoencoderKL(VAE), seed)
    vae.scaling_factor = VAE_SCALING[family]  # what ModelManager sets
    return vae


def tiny_text_encoder(config: TextEncoderConfig = CLIP_L, seed: int = 2) -> CLIPTextModel | OpenCLIPTextModel:
    return randomise(lambda: (CLIPTextModel if config.layout == "hf" else OpenCLIPTextModel)(config), seed)


def tiny_motion(unet: UNetModel, version: str = "v2", seed: int = 3) -> MotionModuleSet:
    """A motion-module set for ``unet``'s sites in the layout of ``version`` (mid module or not, PE length)."""
    sites = {k: c for k, c in unet.motion_sites().items() if HAS_MID[version] or not k.startswith("mid_block")}
    config = MotionConfig(version, f"tiny random {version}", sites, 24 if version == "v1" else 32)
    return randomise(lambda: MotionModuleSet(config), seed)


# ---- twins -------------------------------------------------------------------------------------------------------

def diffusers_unet2d(unet: UNetModel, time_id_dim: int | None = None):
    """diffusers' UNet2DConditionModel with ``unet``'s weights (``time_id_dim``: SDXL's per-time-id width)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    c = unet.config
    if c.transformer_depth[-1] and c.transformer_depth_middle != c.transformer_depth[-1]:
        raise ValueError("diffusers gives the mid block the last level's transformer depth")
    attention = [d > 0 for d in c.transformer_depth]
    kwargs = dict(
        in_channels=c.in_channels, out_channels=c.out_channels, layers_per_block=c.num_res_blocks,
        block_out_channels=[c.model_channels * m for m in c.channel_mult],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        transformer_layers_per_block=[max(d, 1) for d in c.transformer_depth], cross_attention_dim=c.context_dim,
        attention_head_dim=[c.heads(c.model_channels * m)[0] for m in c.channel_mult],  # diffusers: head *count*
        use_linear_projection=c.use_linear_in_transformer,
    )
    ldm_config = {"layers_per_block": c.num_res_blocks}
    if c.adm_in_channels:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=time_id_dim,
                      projection_class_embeddings_input_dim=c.adm_in_channels)
        ldm_config["addition_embed_type"] = "text_time"
    twin = UNet2DConditionModel(**kwargs)
    state = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in unet.state_dict().items()}, ldm_config)
    twin.load_state_dict(state, strict=True)
    return twin.eval()


def diffusers_vae(vae: AutoencoderKL, scaling_factor: float | None = None):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    c = vae.config
    levels = len(c.channel_mult)
    twin = DiffusersVAE(in_channels=c.in_channels, out_channels=c.out_channels, latent_channels=c.latent_channels,
                        block_out_channels=tuple(c.level_channels), layers_per_block=c.num_res_blocks,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels,
                        norm_num_groups=c.norm_groups,
                        scaling_factor=scaling_factor or getattr(vae, "scaling_factor", 0.18215))
    state = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae.state_dict().items()}, twin.config)
    twin.load_state_dict(state, strict=True)
    return twin.eval()


def transformers_text_encoder(encoder: CLIPTextModel | OpenCLIPTextModel):
    """transformers' CLIPTextModel (no projection) or CLIPTextModelWithProjection with ``encoder``'s weights."""
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    c = encoder.config
    config = transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.hidden_mlp, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, max_position_embeddings=c.max_positions, hidden_act=c.activation,
        projection_dim=c.projection_dim or c.width, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    twin = (transformers.CLIPTextModelWithProjection if c.projection_dim else transformers.CLIPTextModel)(config)
    state = encoder.state_dict()
    if c.layout == "open_clip":
        state = convert_open_clip_checkpoint(twin, {OPEN_CLIP_PREFIX + k: v for k, v in state.items()},
                                             prefix=OPEN_CLIP_PREFIX)
    elif not c.projection_dim:  # transformers 5's CLIPTextModel has no "text_model." level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    stray = {k for k in unexpected if not k.endswith("position_ids")}  # a buffer transformers does not save
    if missing or stray:
        raise AssertionError(f"text encoder twin: missing {missing}, unexpected {sorted(stray)}")
    return twin.eval()


def transformers_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer on the vocabulary bundled with vidsynth; SDXL's second one pads with "!"."""
    from transformers import CLIPTokenizer

    data = resources.files("vidsynth") / "data"
    return CLIPTokenizer(str(data / "vocab.json"), str(data / "merges.txt"), pad_token=pad_token, model_max_length=77)


def diffusers_motion_adapter(motion: MotionModuleSet):
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    ours = motion.state_dict()
    state = convert_animatediff_checkpoint_to_diffusers(ours)  # drops the pos_encoder tables: put them back
    for name, table in ours.items():
        if name.endswith("attention_blocks.0.pos_encoder.pe"):
            state[f"{name.split('.temporal_transformer.')[0]}.transformer_blocks.0.pos_embed.pe"] = table
    sites = motion.config.sites
    levels = sorted({int(k.split(".")[1]) for k in sites if k.startswith("down_blocks.")})
    adapter = MotionAdapter(
        block_out_channels=tuple(sites[f"down_blocks.{i}.motion_modules.0"] for i in levels),
        motion_layers_per_block=sum(k.startswith("down_blocks.0.") for k in sites),
        motion_num_attention_heads=motion.config.heads, motion_norm_num_groups=32,
        motion_max_seq_length=motion.config.pe_length, use_motion_mid_block="mid_block.motion_modules.0" in sites)
    adapter.load_state_dict(state, strict=True)
    return adapter.eval()


class PerFrameGroupNorm(nn.Module):
    """diffusers' motion-module GroupNorm sees ``(b, c, f, h, w)`` and pools over frames; this normalises each frame
    alone, as the original v1/v2/v3 code does."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * f, c, h, w))
        return y.reshape(b, f, c, h, w).transpose(1, 2)


class ClipPooledGroupNorm(nn.Module):
    """diffusers' resnet GroupNorm sees ``(b*f, c, h, w)`` and normalises each frame; this pools over each clip's
    frames, as v1's ``nn.GroupNorm`` on the 5-D tensor does. ``frames`` is shared with a hook that reads it off the
    UNet's input."""

    def __init__(self, norm: nn.GroupNorm, frames: dict[str, int]):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.frames["n"]
        bf, c, h, w = x.shape
        y = x.reshape(bf // f, f, c, h, w).transpose(1, 2)
        y = F.group_norm(y, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
        return y.transpose(1, 2).reshape(bf, c, h, w)


def motion_unet(unet: UNetModel, motion: MotionModuleSet, time_id_dim: int | None = None):
    """diffusers' UNetMotionModel with ``unet``'s and ``motion``'s weights, patched to the original models' norms."""
    from diffusers import UNetMotionModel
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    unet2d = diffusers_unet2d(unet, time_id_dim)
    adapter = diffusers_motion_adapter(motion)
    twin = UNetMotionModel.from_unet2d(unet2d, adapter)
    if unet2d.config.addition_embed_type == "text_time":  # from_unet2d leaves SDXL's add_embedding random
        twin.add_embedding.load_state_dict(unet2d.add_embedding.state_dict())
    if not motion.config.pool_motion_norm:
        for module in twin.modules():
            if isinstance(module, AnimateDiffTransformer3D):
                module.norm = PerFrameGroupNorm(module.norm)
    if motion.config.pool_resnet_norms:
        frames = {"n": 1}

        def read_frames(_, args, kwargs):  # sample: (b, c, f, h, w)
            frames["n"] = (args[0] if args else kwargs["sample"]).shape[2]

        twin.register_forward_pre_hook(read_frames, with_kwargs=True)
        for module in twin.modules():
            if isinstance(module, ResnetBlock2D):
                module.norm1 = ClipPooledGroupNorm(module.norm1, frames)
                module.norm2 = ClipPooledGroupNorm(module.norm2, frames)
        twin.conv_norm_out = ClipPooledGroupNorm(twin.conv_norm_out, frames)
    return twin.eval(), adapter


# ---- whole pipelines ---------------------------------------------------------------------------------------------

@dataclass
class TinyVideoModels:
    """Every part of a tiny text-to-video pipeline of one family, ours; ``pipeline()`` and ``diffusers_pipeline()``
    assemble ours and the twin."""

    family: str  # "sd15" or "sdxl"
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel | OpenCLIPTextModel]
    motion: MotionModuleSet

    def pipeline(self):
        from vidsynth.pipelines.sd_video import SDVideoPipeline
        from vidsynth.pipelines.sdxl_video import SDXLVideoPipeline

        cls = SDXLVideoPipeline if self.family == "sdxl" else SDVideoPipeline
        return cls(self.unet, self.vae, self.text_encoders, cls.make_tokenizers(), self.motion)  # device, dtype: the UNet's

    def diffusers_pipeline(self, scheduler):
        """diffusers' AnimateDiffPipeline (SD 1.5) or AnimateDiffSDXLPipeline with the same weights."""
        from diffusers import AnimateDiffPipeline, AnimateDiffSDXLPipeline

        xl = self.family == "sdxl"
        unet, adapter = motion_unet(self.unet, self.motion, SDXL_TIME_ID_DIM if xl else None)
        parts = dict(vae=diffusers_vae(self.vae), text_encoder=transformers_text_encoder(self.text_encoders[0]),
                     tokenizer=transformers_tokenizer(), unet=unet, motion_adapter=adapter, scheduler=scheduler)
        if not xl:
            pipe = AnimateDiffPipeline(**parts)
        else:
            pipe = AnimateDiffSDXLPipeline(**parts, text_encoder_2=transformers_text_encoder(self.text_encoders[1]),
                                           tokenizer_2=transformers_tokenizer(pad_token="!"))
        pipe.set_progress_bar_config(disable=True)
        return pipe


def tiny_sd15(motion_version: str = "v2", seed: int = 0) -> TinyVideoModels:
    unet = tiny_unet(SD15_UNET, seed)
    return TinyVideoModels("sd15", unet, tiny_vae("sd15", seed + 1), [tiny_text_encoder(CLIP_L, seed + 2)],
                           tiny_motion(unet, motion_version, seed + 3))


def tiny_sdxl(seed: int = 0) -> TinyVideoModels:
    unet = tiny_unet(SDXL_UNET, seed)
    encoders = [tiny_text_encoder(CLIP_L, seed + 2), tiny_text_encoder(BIG_G, seed + 4)]
    return TinyVideoModels("sdxl", unet, tiny_vae("sdxl", seed + 1), encoders, tiny_motion(unet, "sdxl_beta", seed + 3))
