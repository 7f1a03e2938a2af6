"""Training configuration: one flat YAML mapping onto :class:`TrainConfig`; every key has a default except the data.

Defaults follow guoyww/AnimateDiff's ``configs/training`` (AdamW 1e-4, weight decay 1e-2, grad-norm clip 1.0,
10% empty captions, 16 frames at stride 4, epsilon loss, latents sampled from the VAE posterior as its train.py
does). The noise schedule, unless set, is the original's for the stage (:data:`STAGE_SCHEDULES`).
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .original import is_original, translate

STAGES = ("domain-adapter", "motion-module", "motion-lora")
OUTPUT_NAMES = {"domain-adapter": "domain_adapter.ckpt", "motion-module": "motion_module.ckpt",
                "motion-lora": "motion_lora.ckpt"}
DEFAULT_RANKS = {"domain-adapter": 128, "motion-lora": 64}  # the ranks of v3_sd15_adapter and the v2 MotionLoRAs
# (family, image stage?) -> (beta_schedule, beta_start, beta_end). SD 1.5: configs/training/v1/training.yaml (motion
# module) and image_finetune.yaml (image stage). SDXL has no original training config: the image stage keeps SDXL's
# own training schedule, the motion stages the one the sdxl branch samples mm_sdxl_v10_beta with.
STAGE_SCHEDULES = {("sd15", False): ("linear", 0.00085, 0.012), ("sd15", True): ("scaled_linear", 0.00085, 0.012),
                   ("sdxl", False): ("scaled_linear", 0.00085, 0.020), ("sdxl", True): ("scaled_linear", 0.00085, 0.012)}


@dataclass
class TrainConfig:
    # data
    data_root: str = ""                       # folder of videos (mp4/webm/gif/webp) and/or folders of frames
    captions: str | None = None               # CSV or JSONL (path,caption); default: captions.csv/.jsonl in data_root
    frames: int = 16                          # frames per clip (the domain adapter trains on single frames)
    stride: int = 4                           # take every stride-th frame of the video
    size: int | list[int] = 256               # frame height and width (an int: square); resized, centre-cropped
    on_bad_data: str = "skip"                 # "skip": report by path and leave out; "error": refuse to start
    cache_latents: bool = False               # encode every video once and train on the stored posteriors
    latent_sampling: str = "sample"           # "sample" the VAE posterior (as the original) or take its "mean"
    cache_text_embeddings: bool = False       # encode every caption once; the text encoders then leave the GPU
    latent_cache_dir: str | None = None       # default: <output_dir>/latent_cache
    caption_dropout: float = 0.1              # share of empty captions (classifier-free guidance)
    num_workers: int = 0                      # data-loader worker processes
    # models
    base: str | None = None                   # SD 1.5 or SDXL single-file checkpoint (UNet, VAE, text encoders)
    vae: str | None = None                    # optional separate VAE file
    motion_module: str | None = None          # start from this file; none: a new one (motion-module stage only)
    motion_version: str | None = None         # version of the file (read off it when unset) or of a new module
    new_motion_pe_length: int = 32            # native frame count of a new module
    rank: int | None = None                   # LoRA rank; default 128 (domain adapter) or 64 (MotionLoRA)
    # optimisation
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False               # bitsandbytes' AdamW8bit (must be installed)
    max_grad_norm: float = 1.0
    max_steps: int = 2000                     # optimizer steps
    batch_size: int = 1                       # clips per process and micro-step
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"               # "no", "fp16" or "bf16"; the frozen base is then stored in that dtype
    gradient_checkpointing: bool = False
    seed: int = 42
    device: str | None = None                 # "cpu" forces the CPU; default: what accelerate picks
    beta_schedule: str | None = None          # default: the original's for the stage (STAGE_SCHEDULES)
    beta_start: float | None = None
    beta_end: float | None = None
    # output
    output_dir: str = "train_output"
    output_name: str | None = None            # default: domain_adapter.ckpt / motion_module.ckpt / motion_lora.ckpt
    checkpoint_every: int = 500               # intermediate checkpoints (optimizer state, step, RNG)
    keep_checkpoints: int | None = None       # keep only the newest N
    resume: str | None = None                 # a checkpoint folder, or "latest" (in output_dir/checkpoints)
    log_every: int = 1                        # loss-log rows (loss.csv and TensorBoard when installed)
    validation_every: int = 0                 # 0: only at the end (when prompts are given)
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 25
    validation_cfg: float = 7.5
    validation_frames: int | None = None      # default: frames (1 for the domain adapter)
    validation_size: int | list[int] | None = None  # default: size
    validation_format: str = "mp4"

    def __post_init__(self) -> None:
        checks = [
            (self.frames >= 1, f"frames must be at least 1, got {self.frames}"),
            (self.stride >= 1, f"stride must be at least 1, got {self.stride}"),
            (self.on_bad_data in ("skip", "error"), f"on_bad_data must be 'skip' or 'error', got {self.on_bad_data!r}"),
            (self.latent_sampling in ("sample", "mean"),
             f"latent_sampling must be 'sample' or 'mean', got {self.latent_sampling!r}"),
            (0 <= self.caption_dropout <= 1, f"caption_dropout must be in [0, 1], got {self.caption_dropout}"),
            (self.mixed_precision in ("no", "fp16", "bf16"),
             f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}"),
            (self.max_steps >= 1 and self.batch_size >= 1 and self.gradient_accumulation_steps >= 1,
             "max_steps, batch_size and gradient_accumulation_steps must be at least 1"),
            (self.checkpoint_every >= 1 and self.log_every >= 1 and self.validation_every >= 0,
             "checkpoint_every and log_every must be at least 1, validation_every at least 0"),
            (self.rank is None or self.rank >= 1, f"rank must be at least 1, got {self.rank}"),
            (self.keep_checkpoints is None or self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (self.lr_warmup_steps >= 0, f"lr_warmup_steps must be at least 0, got {self.lr_warmup_steps}"),
            (self.validation_steps >= 1, f"validation_steps must be at least 1, got {self.validation_steps}"),
            (self.validation_format in ("mp4", "webm", "gif", "webp"),
             f"validation_format must be 'mp4', 'webm', 'gif' or 'webp', got {self.validation_format!r}"),
        ]
        problems = [message for ok, message in checks if not ok]
        for name in ("size", "validation_size"):
            value = getattr(self, name)
            if value is not None and _hw(value) is None:
                problems.append(f"{name} must be a positive multiple of 8 or [height, width] of such, got {value!r}")
        if problems:
            raise ConfigError("training config: " + "; ".join(problems))

    @property
    def height_width(self) -> tuple[int, int]:
        return _hw(self.size)

    def validation_height_width(self) -> tuple[int, int]:
        return _hw(self.validation_size) if self.validation_size is not None else self.height_width

    def lora_rank(self, stage: str) -> int:
        return self.rank or DEFAULT_RANKS[stage]

    def noise_schedule(self, stage: str, family: str) -> tuple[str, float, float]:
        """(beta_schedule, beta_start, beta_end): the settings given, the rest from the stage's original."""
        default = STAGE_SCHEDULES[family, stage == "domain-adapter"]
        given = (self.beta_schedule, self.beta_start, self.beta_end)
        return tuple(d if g is None else g for g, d in zip(given, default))

    def output_file(self, stage: str) -> Path:
        return Path(self.output_dir) / (self.output_name or OUTPUT_NAMES[stage])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "training config") -> "TrainConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(hints)}; known settings are "
                              f"{', '.join(known)}")
        return cls(**{key: _coerce(key, value) for key, value in values.items()})


def _coerce(key: str, value: Any) -> Any:
    """YAML reads ``1e-4`` (no dot) as a string; numbers must still be numbers."""
    kind = next(f.type for f in fields(TrainConfig) if f.name == key)
    if kind.endswith(" | None"):
        if value is None:
            return None
        kind = kind.removesuffix(" | None")
    if kind == "list[str]":
        value = [value] if isinstance(value, str) else value
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"setting {key!r} must be a list of strings, got {value!r}")
        return value
    if kind == "float" and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    wanted = {"float": float, "int": int, "bool": bool, "str": str}.get(kind)
    if wanted and not (isinstance(value, wanted) and (wanted is bool or not isinstance(value, bool))):
        raise ConfigError(f"setting {key!r} must be a {kind}, got {value!r}")
    return value


def _hw(value) -> tuple[int, int] | None:
    pair = [value, value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else []
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 and v % 8 == 0 for v in pair):
        return None
    return pair[0], pair[1]


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML training config, ours or the original AnimateDiff's (:mod:`.original`, reported key by key);
    unknown keys and impossible values raise ConfigError naming them."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"training config {str(path)!r} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"training config {str(path)!r} is not valid YAML: {err}") from None
    if is_original(values):
        translation = translate(values, {f.name for f in fields(TrainConfig)})
        print(translation.report(str(path)), file=sys.stderr)
        values = translation.values
    try:
        return TrainConfig.from_dict(values, source=str(path))
    except TypeError as err:
        raise ConfigError(f"{path}: {err}") from None
