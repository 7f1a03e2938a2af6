"""vidsynth: AnimateDiff video generation and training on Stable Diffusion 1.5 / SDXL single-file checkpoints."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelManager": ".manager",
    "SDVideoPipeline": ".pipelines.sd_video",
    "SDXLVideoPipeline": ".pipelines.sdxl_video",
    "ControlNetConfigUnit": ".pipelines.controlnet",
    "SDImagePipeline": ".pipelines.image",
    "SDXLImagePipeline": ".pipelines.image",
    "VideoData": ".video_data",
    "save_frames": ".video_data",
    "save_video": ".video_io",
    "load_video": ".video_io",
    "download_models": ".download",
    "Checkpoint": ".checkpoints",
    "identify": ".checkpoints",
    "VidsynthError": ".errors",
    "CheckpointError": ".errors",
    "ConfigError": ".errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # imported on first use so `import vidsynth` stays light (no model code until it is needed)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vidsynth' has no attribute {name!r}")
