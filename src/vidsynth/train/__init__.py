"""Training the three AnimateDiff stages: domain adapter, motion module, MotionLoRA.

``vidsynth train motion-lora --config zoom.yaml`` or, from Python::

    from vidsynth.train import run_from_config
    path = run_from_config("motion-lora", "zoom.yaml")   # the MotionLoRA file, loadable by ModelManager.load_lora

With your own modules (e.g. small ones): ``Trainer(stage, TrainConfig(...), TrainModels(unet, vae, text_encoder,
tokenizer, motion_modules)).run()``.
"""
from __future__ import annotations

from pathlib import Path

from .config import STAGES, TrainConfig, load_config
from .data import VideoClipDataset
from .loop import Trainer, make_accelerator, WEIGHT_DTYPES
from .stages import TrainModels, new_motion_modules

__all__ = ["STAGES", "TrainConfig", "TrainModels", "Trainer", "VideoClipDataset", "load_config",
           "new_motion_modules", "run_from_config", "train"]


def train(stage: str, config: TrainConfig, models: TrainModels | None = None) -> Path:
    """Run one stage; models are loaded from ``config.base`` / ``config.motion_module`` when not given."""
    accelerator = make_accelerator(config)
    if models is None:
        models = TrainModels.load(config, accelerator.device, WEIGHT_DTYPES[config.mixed_precision])
    return Trainer(stage, config, models, accelerator=accelerator).run()


def run_from_config(stage: str, config_path: str | Path) -> Path:
    """What ``vidsynth train STAGE --config FILE.yaml`` runs; returns the trained file's path."""
    if stage not in STAGES:
        from ..errors import ConfigError
        raise ConfigError(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    path = train(stage, load_config(config_path))
    print(f"wrote {path}")
    return path
