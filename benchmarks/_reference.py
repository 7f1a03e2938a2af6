"""The diffusers/transformers contenders, built offline from the same single files as ours.

Configuration comes from the original LDM/SGM inference configs (as dicts, so ``from_single_file`` needs no
network) and from transformers/diffusers config folders written here; the weights are converted by diffusers' own
single-file converters (``diffusers.loaders.single_file_utils``), as ``from_single_file`` pipelines do. The file is
read once and shared by the components, as diffusers' single-file pipeline loader does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                     "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                     "attn_resolutions": [], "dropout": 0.0}}

# configs/stable-diffusion/v1-inference.yaml of the original repository
V1_INFERENCE = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 64, "channels": 4,
    "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
        "legacy": False}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": _VAE},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}

# configs/inference/sd_xl_base.yaml of generative-models
SD_XL_BASE = {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
    "scale_factor": 0.13025,
    "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
        "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
        "context_dim": 2048, "legacy": False}},
    "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": _VAE}}}}

ORIGINAL_CONFIGS = {"sd15": V1_INFERENCE, "sdxl": SD_XL_BASE}

# openai/clip-vit-large-patch14 and laion/CLIP-ViT-bigG-14 text towers (as diffusers' SD/SDXL repositories have them)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)


def write_config_folder(root: Path, family: str) -> Path:
    """A local diffusers-style folder holding only the text encoders' config.json files."""
    from transformers import CLIPTextConfig

    folder = root / f"diffusers-configs-{family}"
    CLIPTextConfig(**CLIP_L).save_pretrained(folder / "text_encoder")
    if family == "sdxl":
        CLIPTextConfig(**CLIP_BIG_G).save_pretrained(folder / "text_encoder_2")
    return folder


def load_components(path: str | Path, family: str, dtype: torch.dtype, workdir: Path) -> dict:
    """UNet2DConditionModel, AutoencoderKL and the text encoder(s) from one single file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = write_config_folder(workdir, family)
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    original = ORIGINAL_CONFIGS[family]
    parts = {"unet": UNet2DConditionModel.from_single_file(checkpoint, original_config=original, torch_dtype=dtype),
             "vae": AutoencoderKL.from_single_file(checkpoint, original_config=original, torch_dtype=dtype)}
    encoders = {"text_encoder": CLIPTextModel}
    if family == "sdxl":
        encoders["text_encoder_2"] = CLIPTextModelWithProjection
    for name, cls in encoders.items():
        parts[name] = create_diffusers_clip_model_from_ldm(cls, checkpoint, subfolder=name, config=str(folder),
                                                           torch_dtype=dtype, local_files_only=True)
    del checkpoint
    return parts


def load_motion_adapter(path: str | Path, family: str, dtype: torch.dtype, workdir: Path):
    """MotionAdapter.from_single_file with a local config read off the file (channels, PE length, mid block)."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    pe_length = next(t.shape[1] for k, t in checkpoint.items() if k.endswith("pos_encoder.pe"))
    config = {"_class_name": "MotionAdapter", "block_out_channels": [320, 640, 1280, 1280][:4 if family == "sd15" else 3],
              "motion_layers_per_block": 2, "motion_num_attention_heads": 8, "motion_norm_num_groups": 32,
              "motion_max_seq_length": pe_length,
              "use_motion_mid_block": any(k.startswith("mid_block.") for k in checkpoint)}
    folder = workdir / f"diffusers-configs-{family}-motion"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return MotionAdapter.from_single_file(checkpoint, config=str(folder), torch_dtype=dtype, local_files_only=True)


def motion_unet(unet, adapter):
    """UNetMotionModel.from_unet2d(unet, adapter) without its second full-size random initialisation: the model is
    built on the meta device and takes the UNet's and the adapter's tensors themselves (``assign=True``), so the
    assembly holds one copy of the weights. Same weights, same module, less memory than the plain call."""
    from accelerate import init_empty_weights
    from diffusers import UNetMotionModel

    with init_empty_weights(include_buffers=True):
        model = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
    state = {**unet.state_dict(), **adapter.state_dict()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("pos_embed.pe")]
    if missing or unexpected:
        raise RuntimeError(f"UNetMotionModel assembly: missing {missing[:5]}, unexpected {unexpected[:5]}")
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"UNetMotionModel assembly left tensors on meta: {leftovers[:5]}")
    return model.to(unet.device, unet.dtype).eval()
