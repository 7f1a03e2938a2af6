"""Tiny single-file checkpoints on disk (SD 1.5 layout base, v2 motion module, MotionLoRA) for CLI-level tests."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from vidsynth.models.motion import MotionConfig, MotionModuleSet
from vidsynth.models.text import CLIPTextModel, TextEncoderConfig
from vidsynth.models.unet import UNetConfig, UNetModel
from vidsynth.models.vae import AutoencoderKL, VAEConfig

# the smallest models whose shapes the loaders read back exactly: CLIP heads = width / 64, VAE norms of 32 groups,
# SD 1.x heads = 8
UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                  transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, context_dim=64, num_heads=8)
CLIP = TextEncoderConfig(vocab_size=49408, width=64, layers=2, heads=1, max_positions=77, activation="quick_gelu",
                         projection_dim=None, layout="hf")
VAE = VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1)
MOTION_LORA_SITE = ("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0."
                    "processor")


def write_tiny_files(root: Path) -> dict[str, Path]:
    """{"base": .safetensors (fp16), "motion": v2 .ckpt, "motion_lora": .ckpt} under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = UNetModel(UNET)
    parts = {"model.diffusion_model.": unet, "first_stage_model.": AutoencoderKL(VAE),
             "cond_stage_model.transformer.": CLIPTextModel(CLIP)}
    base = {prefix + k: v.half().contiguous() if v.is_floating_point() else v
            for prefix, module in parts.items() for k, v in module.state_dict().items()}
    files = {"base": root / "tiny_sd15.safetensors", "motion": root / "tiny_mm_v2.ckpt",
             "motion_lora": root / "tiny_motion_lora.ckpt"}
    save_file(base, files["base"])
    motion = MotionModuleSet(MotionConfig("v2", "tiny", unet.motion_sites(), 32))
    torch.save({k: v.clone() for k, v in motion.state_dict().items()}, files["motion"])
    torch.save({f"{MOTION_LORA_SITE}.to_q_lora.down.weight": torch.randn(4, 32),
                f"{MOTION_LORA_SITE}.to_q_lora.up.weight": torch.randn(32, 4)}, files["motion_lora"])
    return files


def write_lora_files(folder: Path) -> dict[str, Path]:
    """LoRA files for the models of ``write_tiny_files``, named and laid out like the README's: two MotionLoRAs
    (v2_lora_ZoomIn / v2_lora_PanLeft.ckpt) and a v3-style domain adapter on the UNet's first attention block."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    adapter_site = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    files = {}
    for name, site in (("v2_lora_ZoomIn.ckpt", MOTION_LORA_SITE), ("v2_lora_PanLeft.ckpt", MOTION_LORA_SITE),
                       ("v3_sd15_adapter.ckpt", adapter_site)):
        state = {}
        for proj in ("to_q", "to_v", "to_out"):
            state[f"{site}.{proj}_lora.down.weight"] = torch.randn(4, 32, generator=g) * 0.3
            state[f"{site}.{proj}_lora.up.weight"] = torch.randn(32, 4, generator=g) * 0.3
        files[name] = folder / name
        torch.save(state, files[name])
    return files


def write_tiny_controlnet(path: Path) -> Path:
    """A random cldm-layout ControlNet (keys under control_model.) that fits write_tiny_files' UNet."""
    from dataclasses import replace

    from test_controlnet import HINT
    from tiny_models import randomise
    from vidsynth.models.controlnet import CLDM_PREFIX, ControlNet, ControlNetConfig

    net = randomise(lambda: ControlNet(ControlNetConfig(replace(UNET), HINT)), seed=7)
    torch.save({CLDM_PREFIX + k: v for k, v in net.state_dict().items()}, path)
    return path
