"""The three AnimateDiff training stages: which modules run, which train, and what file comes out.

- domain adapter: low-rank updates in the image UNet's spatial attn1/attn2, trained on single frames, no motion module;
- motion module: the temporal transformers, trained on clips with the image model frozen (a new set starts as the
  identity: zero ``proj_out``);
- MotionLoRA: low-rank updates in the motion modules' temporal attention, UNet and motion module frozen.

SD 1.5 and SDXL alike: an SDXL base (its UNet takes ``y``) brings its second text encoder, and a new SDXL motion
module has the beta module's 15 sites (3 down levels x 2, 3 up levels x 3, no mid module).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..models.motion import _VERSION_LAYOUT as VERSION_LAYOUT  # version -> (base family, has a mid module)
from ..models.motion import MotionConfig, MotionModuleSet, PositionalEncoding
from ..tokenizer import CLIPTokenizer
from .config import STAGES, TrainConfig
from .lowrank import LowRankSet, domain_adapter_targets, motion_lora_targets


@dataclass
class TrainModels:
    """The modules a stage needs; build them from files (:meth:`load`) or directly (tests, custom code)."""
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: CLIPTokenizer
    motion_modules: MotionModuleSet | None = None
    text_encoder_2: nn.Module | None = None     # SDXL: OpenCLIP bigG
    tokenizer_2: CLIPTokenizer | None = None    # SDXL: pads with "!" (id 0)

    @property
    def family(self) -> str:
        return "sdxl" if getattr(self.unet, "label_emb", None) is not None else "sd15"

    def text_encoders(self) -> tuple[list[nn.Module], list[CLIPTokenizer]]:
        if self.family == "sd15":
            return [self.text_encoder], [self.tokenizer]
        if self.text_encoder_2 is None:
            raise ConfigError("an SDXL UNet needs both text encoders: TrainModels(text_encoder_2=OpenCLIP bigG)")
        return [self.text_encoder, self.text_encoder_2], [self.tokenizer, self.tokenizer_2 or CLIPTokenizer(pad_id=0)]

    @classmethod
    def load(cls, config: TrainConfig, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "TrainModels":
        from ..manager import ModelManager

        if not config.base:
            raise ConfigError("the training config names no base model: set `base:` to an SD 1.5 or SDXL single-file "
                              "checkpoint (e.g. v1-5-pruned-emaonly.safetensors)")
        manager = ModelManager(torch_dtype=dtype, device=device)
        manager.load_models([config.base])
        needed = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if manager.family == "sdxl" else [])
        if manager.family not in ("sd15", "sdxl") or any(manager.fetch_model(n) is None for n in needed):
            raise ConfigError(f"{config.base}: training needs an SD 1.5 or SDXL single-file checkpoint with UNet, VAE "
                              f"and text encoder(s) (found {manager.family or 'no'} family, {sorted(manager.models)})")
        if config.vae:
            manager.load_models([config.vae])
        if config.motion_module:
            manager.load_models([config.motion_module], motion_version=config.motion_version)
        return cls(manager.unet, manager.vae, manager.text_encoder, CLIPTokenizer(), manager.motion_modules,
                   manager.text_encoder_2, CLIPTokenizer(pad_id=0) if manager.family == "sdxl" else None)


def new_motion_modules(unet: nn.Module, version: str | None = None, pe_length: int = 32) -> MotionModuleSet:
    """An untrained motion-module set for ``unet`` (zero output projections: the video model equals the image model
    frame by frame). v2-style versions have a mid-block module, v1/v3 and the SDXL beta layout none. Default
    version: v3 on SD 1.5, sdxl_beta on SDXL."""
    sdxl = getattr(unet, "label_emb", None) is not None
    version = version or ("sdxl_beta" if sdxl else "v3")
    allowed = [v for v, (family, _) in VERSION_LAYOUT.items() if family == ("sdxl" if sdxl else "sd15")]
    if version not in allowed:
        raise ConfigError(f"a new {'SDXL' if sdxl else 'SD 1.5'} motion module can be version {', '.join(allowed)}, "
                          f"not {version!r}")
    sites = {name: ch for name, ch in unet.motion_sites().items()
             if VERSION_LAYOUT[version][1] or not name.startswith("mid_block")}
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
    for module in (models.unet, models.vae, models.text_encoder, models.text_encoder_2, models.motion_modules):
        if module is not None:
            module.requires_grad_(False)
    if stage == "domain-adapter":
        adapter = LowRankSet(models.unet, domain_adapter_targets(models.unet), config.lora_rank(stage))
        setup = StageSetup(None, adapter, 1, adapter.file_state_dict)
    elif stage == "motion-module":
        if models.motion_modules is None:
            models.motion_modules = new_motion_modules(models.unet, config.motion_version,
                                                       config.new_motion_pe_length)
        motion = models.motion_modules
        setup = StageSetup(motion, motion, config.frames, lambda: motion_file_state(motion))
    else:
        if models.motion_modules is None:
            raise ConfigError("MotionLoRA training needs a motion module: set `motion_module:` to e.g. "
                              "mm_sd_v15_v2.ckpt or mm_sdxl_v10_beta.ckpt (the MotionLoRA only works with the module "
                              "it was trained on)")
        if models.motion_modules.config.base_family != models.family:
            raise ConfigError(f"the motion module is for {models.motion_modules.config.base_family}, the base model "
                              f"is {models.family}")
        lora = LowRankSet(models.motion_modules, motion_lora_targets(models.motion_modules), config.lora_rank(stage))
        setup = StageSetup(models.motion_modules, lora, config.frames, lora.file_state_dict)
    if setup.motion is not None and config.frames > setup.motion.config.pe_length:
        raise ConfigError(f"frames={config.frames} exceeds the motion module's native length "
                          f"{setup.motion.config.pe_length}; train on shorter clips")
    setup.trainable.float().requires_grad_(True)
    return setup
