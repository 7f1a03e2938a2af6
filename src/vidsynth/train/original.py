"""Reading guoyww/AnimateDiff's own training YAML (``configs/training/v1/training.yaml``, ``image_finetune.yaml``).

A file with the original's keys (``train_data``, ``noise_scheduler_kwargs``, ...) is mapped onto :class:`TrainConfig`
and every key is reported as honoured or not, with the reason. Keys of our own format may sit in the same file and
win (e.g. ``base:``, since the original names a diffusers folder, which vidsynth does not read).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MARKERS = ("train_data", "noise_scheduler_kwargs", "unet_additional_kwargs", "image_finetune", "train_batch_size",
           "max_train_steps", "pretrained_model_path")

# original key -> our key, values taken as they are
SAME = {"output_dir": "output_dir", "learning_rate": "learning_rate", "lr_warmup_steps": "lr_warmup_steps",
        "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2", "adam_weight_decay": "adam_weight_decay",
        "adam_epsilon": "adam_epsilon", "max_grad_norm": "max_grad_norm", "train_batch_size": "batch_size",
        "gradient_accumulation_steps": "gradient_accumulation_steps", "max_train_steps": "max_steps",
        "gradient_checkpointing": "gradient_checkpointing", "checkpointing_steps": "checkpoint_every",
        "validation_steps": "validation_every", "global_seed": "seed", "use_adamw8bit": "use_8bit_adam",
        "num_workers": "num_workers"}
TRAIN_DATA = {"csv_path": "captions", "video_folder": "data_root", "sample_size": "size",
              "sample_stride": "stride", "sample_n_frames": "frames"}
VALIDATION = {"prompts": "validation_prompts", "num_inference_steps": "validation_steps",
              "guidance_scale": "validation_cfg"}
# settings our architecture fixes: honoured when the file asks for exactly that
FIXED_UNET = {"use_motion_module": True, "motion_module_resolutions": [1, 2, 4, 8],
              "unet_use_cross_frame_attention": False, "unet_use_temporal_attention": False,
              "motion_module_decoder_only": False, "motion_module_type": "Vanilla"}
FIXED_MOTION = {"num_attention_heads": 8, "num_transformer_block": 1,
                "attention_block_types": ["Temporal_Self", "Temporal_Self"], "temporal_position_encoding": True,
                "temporal_attention_dim_div": 1, "zero_initialize": True}
# (use_inflated_groupnorm, motion_module_mid_block) -> version, as the config's own comments list them
VERSIONS = {(False, False): "v1", (True, True): "v2", (True, False): "v3"}
# no effect on what is trained, or an equivalent of ours
IGNORED = {"name": "run name (outputs go to output_dir itself, no timestamped sub-folder)",
           "use_wandb": "no Weights & Biases logging (loss.csv and TensorBoard instead)",
           "launcher": "processes come from `accelerate launch`, not slurm/pytorch launchers",
           "is_debug": "no debug mode",
           "enable_xformers_memory_efficient_attention": "attention always runs through PyTorch SDPA",
           "validation_steps_tuple": "validation runs every validation_every steps and at the end only",
           "ema_decay": "unused by the original train.py as well"}


# what the original train.py / WebVid10M do without a key for it
BUILT_IN = ["(WebVid10M) RandomHorizontalFlip: clips are not flipped here (a flip reverses the pans a MotionLoRA "
            "learns)",
            "(train.py) captions over 77 tokens: encoded in 77-token chunks here, truncated there"]


def is_original(values: Any) -> bool:
    return isinstance(values, dict) and any(key in values for key in MARKERS)


@dataclass
class Translation:
    values: dict[str, Any] = field(default_factory=dict)
    honoured: list[str] = field(default_factory=list)
    not_honoured: list[str] = field(default_factory=list)
    stage: str | None = None  # what the file trains: motion-module, or domain-adapter for image_finetune

    def take(self, key: str, ours: str, value: Any) -> None:
        self.values[ours] = value
        self.honoured.append(f"{key} -> {ours}")

    def refuse(self, key: str, why: str) -> None:
        self.not_honoured.append(f"{key}: {why}")

    def report(self, source: str) -> str:
        stage = f" (the original trains what `vidsynth train {self.stage}` does)" if self.stage else ""
        lines = [f"{source}: original AnimateDiff training config, mapped onto vidsynth's{stage}",
                 "  honoured: " + ", ".join(self.honoured)]
        lines += ["  not honoured:"] + [f"    {item}" for item in self.not_honoured] if self.not_honoured else []
        return "\n".join(lines)


def translate(values: dict[str, Any], known: set[str]) -> Translation:
    """Map an original config (plus any of our own ``known`` keys, which win) onto our settings."""
    out = Translation()
    for key, value in values.items():
        if key in known and key not in SAME:
            continue  # ours, applied last
        if key in SAME:
            out.take(key, SAME[key], value)
        elif key in ("train_data", "validation_data"):
            _section(out, key, value, TRAIN_DATA if key == "train_data" else VALIDATION)
        elif key == "noise_scheduler_kwargs":
            _scheduler(out, value)
        elif key == "unet_additional_kwargs":
            _unet(out, value)
        elif key == "image_finetune":
            out.stage = "domain-adapter" if value else "motion-module"
            if value:
                out.refuse(key, "the original fine-tunes the whole image UNet; vidsynth trains the image stage as a "
                                "LoRA domain adapter (vidsynth train domain-adapter)")
            else:
                out.honoured.append(f"{key} (motion-module stage)")
        elif key == "trainable_modules":
            _trainable(out, value)
        elif key == "pretrained_model_path":
            if Path(str(value)).suffix in (".safetensors", ".ckpt", ".pt", ".pth"):
                out.take(key, "base", value)
            else:
                out.refuse(key, f"{value!r} is a diffusers folder, which vidsynth does not read: " +
                           ("`base:` is used instead" if "base" in values else "add `base:` with the single-file "
                                                                                "checkpoint"))
        elif key == "unet_checkpoint_path":
            if value:
                out.take(key, "motion_module", value)
        elif key == "resume_ckpt":
            if value:
                out.refuse(key, "the original's checkpoints are not ours: use `resume:` with a vidsynth checkpoint")
        elif key in ("cfg_random_null_text", "cfg_random_null_text_ratio"):
            enabled = values.get("cfg_random_null_text", True)
            out.take(key, "caption_dropout", values.get("cfg_random_null_text_ratio", 0.1) if enabled else 0.0)
        elif key == "mixed_precision_training":
            out.take(key, "mixed_precision", "fp16" if value else "no")
        elif key == "lr_scheduler":
            _only(out, key, value, "constant", "constant learning rate after the linear warm-up only")
        elif key == "scale_lr":
            _only(out, key, value, False, "the learning rate is not scaled by the global batch")
        elif key in ("max_train_epoch", "checkpointing_epochs"):
            _only(out, key, value, -1, "steps only: set max_train_steps / checkpointing_steps")
        elif key in IGNORED:
            out.refuse(key, IGNORED[key])
        else:
            out.refuse(key, "not a setting of the original train.py that vidsynth knows")
    out.values.update({key: value for key, value in values.items() if key in known and key not in SAME})
    out.not_honoured += BUILT_IN
    return out


def _section(out: Translation, name: str, section: Any, mapping: dict[str, str]) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{name} must be a mapping, got {section!r}")
    for key, value in section.items():
        if key in mapping:
            out.take(f"{name}.{key}", mapping[key], value)
        else:
            out.refuse(f"{name}.{key}", "no counterpart")


def _scheduler(out: Translation, kwargs: Any) -> None:
    for key, value in (kwargs or {}).items():
        if key in ("beta_start", "beta_end", "beta_schedule"):
            out.take(f"noise_scheduler_kwargs.{key}", key, value)
        elif key == "num_train_timesteps":
            _only(out, f"noise_scheduler_kwargs.{key}", value, 1000, "training uses 1000 timesteps")
        elif key in ("steps_offset", "clip_sample", "set_alpha_to_one"):
            out.refuse(f"noise_scheduler_kwargs.{key}", "a DDIM sampling setting; validation videos use the "
                                                         "motion module's own sampler settings")
        elif key == "prediction_type":
            _only(out, f"noise_scheduler_kwargs.{key}", value, "epsilon", "epsilon prediction only")
        else:
            out.refuse(f"noise_scheduler_kwargs.{key}", "no counterpart")


def _unet(out: Translation, kwargs: Any) -> None:
    kwargs = dict(kwargs or {})
    motion = dict(kwargs.pop("motion_module_kwargs", None) or {})
    inflated, mid = kwargs.pop("use_inflated_groupnorm", None), kwargs.pop("motion_module_mid_block", None)
    if inflated is not None or mid is not None:
        version = VERSIONS.get((bool(inflated), bool(mid)))
        if version:
            out.take("unet_additional_kwargs.use_inflated_groupnorm/motion_module_mid_block", "motion_version",
                     version)
        else:
            out.refuse("unet_additional_kwargs.motion_module_mid_block", "a mid-block module with per-clip resnet "
                       "norms is no released version (v1: neither, v2: both, v3: inflated norms only)")
    length = motion.pop("temporal_position_encoding_max_len", None)
    if length is not None:
        out.take("motion_module_kwargs.temporal_position_encoding_max_len", "new_motion_pe_length", length)
    for prefix, given, fixed in (("unet_additional_kwargs", kwargs, FIXED_UNET),
                                 ("motion_module_kwargs", motion, FIXED_MOTION)):
        for key, value in given.items():
            if key in fixed:
                _only(out, f"{prefix}.{key}", value, fixed[key], f"fixed to {fixed[key]!r} (the released modules')")
            else:
                out.refuse(f"{prefix}.{key}", "no counterpart")


def _trainable(out: Translation, modules: Any) -> None:
    if list(modules or []) == ["motion_modules."]:
        out.honoured.append("trainable_modules (the motion modules)")
    else:
        out.refuse("trainable_modules", f"{modules!r}: the stage decides what trains (motion modules, MotionLoRA or "
                                        "domain adapter)")


def _only(out: Translation, key: str, value: Any, wanted: Any, why: str) -> None:
    if value == wanted:
        out.honoured.append(key)
    else:
        out.refuse(key, f"{value!r} asked for: {why}")
