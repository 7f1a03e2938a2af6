"""The three AnimateDiff training stages: which modules run, which train, and what file comes out.

- domain adapter: low-rank updates in the image UNet's spatial attn1/attn2, trained on single frames, no motion module;
- motion module: the temporal transformers, trained on clips with the image model frozen (a new set starts as the
  identity: zero ``proj_out``);
- MotionLoRA: low-rank updates in the motion modules' temporal attention, UNet and motion module frozen.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..models.motion import MotionConfig, MotionModuleSet, PositionalEncoding
from ..tokenizer import CLIPTokenizer
from .config import STAGES, TrainConfig
from .lowrank import LowRankSet, domain_adapter_targets, motion_lora_targets

_MID_MODULE = {"v1": False, "v2": True, "v3": False, "animatelcm": True, "lightning": True}


@dataclass
class TrainModels:
    """The modules a stage needs; build them from files (:meth:`load`) or directly (tests, custom code)."""
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: CLIPTokenizer
    motion_modules: MotionModuleSet | None = None

    @classmethod
    def load(cls, config: TrainConfig, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "TrainModels":
        from ..manager import ModelManager

        if not config.base:
            raise ConfigError("the training config names no base model: set `base:` to an SD 1.5 single-file "
                              "checkpoint (e.g. v1-5-pruned-emaonly.safetensors)")
        manager = ModelManager(torch_dtype=dtype, device=device)
        manager.load_models([config.base])
        if manager.family != "sd15" or manager.text_encoder is None or manager.vae is None:
            raise ConfigError(f"{config.base}: training needs an SD 1.5 single-file checkpoint with UNet, VAE and text "
                              f"encoder (found {manager.family or 'no'} family, {sorted(manager.models)})")
        if config.vae:
            manager.load_models([config.vae])
        if config.motion_module:
            manager.load_models([config.motion_module], motion_version=config.motion_version)
        return cls(manager.unet, manager.vae, manager.text_encoder, CLIPTokenizer(), manager.motion_modules)


def new_motion_modules(unet: nn.Module, version: str = "v3", pe_length: int = 32) -> MotionModuleSet:
    """An untrained motion-module set for ``unet`` (zero output projections: the video model equals the image model
    frame by frame). v2-style versions have a mid-block module, v1/v3 none."""
    if version not in _MID_MODULE:
        raise ConfigError(f"a new SD 1.5 motion module can be version {', '.join(_MID_MODULE)}, not {version!r}")
    sites = {name: ch for name, ch in unet.motion_sites().items()
             if _MID_MODULE[version] or not name.startswith("mid_block")}
    config = MotionConfig(version, f"new {version}-layout module for training", sites, pe_length)
    return MotionModuleSet.new(config).to(next(unet.parameters()).device)


def motion_file_state(motion: MotionModuleSet) -> dict[str, torch.Tensor]:
    """A motion-module set as the flat AnimateDiff file: every parameter and every ``pos_encoder.pe`` table."""
    state = {k: v.detach().cpu().clone() for k, v in motion.state_dict().items()}
    for name, module in motion.named_modules():
        if isinstance(module, PositionalEncoding):
            state[f"{name}.pe"] = module.pe.detach().float().cpu().clone()
    return state


@dataclass
class StageSetup:
    motion: MotionModuleSet | None        # what the UNet runs at its motion sites
    trainable: nn.Module                  # its parameters, and only they, train
    frames: int                           # frames per training sample
    export: Callable[[], dict[str, torch.Tensor]]


def setup_stage(stage: str, config: TrainConfig, models: TrainModels) -> StageSetup:
    if stage not in STAGES:
        raise ConfigError(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    if getattr(models.unet, "label_emb", None) is not None:
        raise ConfigError("training supports SD 1.5 UNets; this one is SDXL-style (it takes pooled text + time ids)")
    for module in (models.unet, models.vae, models.text_encoder, models.motion_modules):
        if module is not None:
            module.requires_grad_(False)
    if stage == "domain-adapter":
        adapter = LowRankSet(models.unet, domain_adapter_targets(models.unet), config.lora_rank(stage))
        setup = StageSetup(None, adapter, 1, adapter.file_state_dict)
    elif stage == "motion-module":
        if models.motion_modules is None:
            models.motion_modules = new_motion_modules(models.unet, config.motion_version or "v3",
                                                       config.new_motion_pe_length)
        motion = models.motion_modules
        setup = StageSetup(motion, motion, config.frames, lambda: motion_file_state(motion))
    else:
        if models.motion_modules is None:
            raise ConfigError("MotionLoRA training needs a motion module: set `motion_module:` to e.g. "
                              "mm_sd_v15_v2.ckpt (the MotionLoRA only works with the module it was trained on)")
        lora = LowRankSet(models.motion_modules, motion_lora_targets(models.motion_modules), config.lora_rank(stage))
        setup = StageSetup(models.motion_modules, lora, config.frames, lora.file_state_dict)
    if setup.motion is not None and config.frames > setup.motion.config.pe_length:
        raise ConfigError(f"frames={config.frames} exceeds the motion module's native length "
                          f"{setup.motion.config.pe_length}; train on shorter clips")
    setup.trainable.float().requires_grad_(True)
    return setup
