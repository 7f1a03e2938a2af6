"""`vidsynth animate CONFIG.yaml`: the prompt configs of the original AnimateDiff repository (guoyww/AnimateDiff
configs/prompts), read the way its scripts/animate.py reads them, rendered through the same ``render`` as
`vidsynth generate`.

Two formats: the current one, a list of entries, and the one before December 2023, a mapping ``Name: {entry}`` whose
``motion_module`` may be a list (each module renders every prompt in turn). Keys and their defaults follow the
original script: ``lora_alpha`` 0.8, ``adapter_lora_scale`` 1.0, ``seed`` -1 (random), W/H/L from the command line
(512/512/16), ``inference_config`` inference-v1 when absent. Paths are relative to the working directory, as there.
SparseCtrl entries (``controlnet_path``, ``controlnet_images`` at ``controlnet_image_indexs``) condition on their
keyframes through the pipeline's SparseCtrl stage. Every config is checked in full before the first model is loaded.
"""
from __future__ import annotations

import datetime
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_INFERENCE_CONFIG = "configs/inference/inference-v1.yaml"  # the original script's --inference-config default
# noise_scheduler_kwargs of the original inference configs; the script always samples with DDIMScheduler
INFERENCE_CONFIGS = {name: {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear", "steps_offset": 1}
                     for name in ("inference-v1", "inference-v2", "inference-v3")}
DDIM_DEFAULTS = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "steps_offset": 0}
SCHEDULER_KEYS = {"beta_start", "beta_end", "beta_schedule", "steps_offset", "prediction_type", "timestep_spacing"}
SPARSECTRL_KEYS = ("controlnet_path", "controlnet_config", "controlnet_images", "controlnet_image_indexs",
                   "normalize_condition_images")
KNOWN_KEYS = {"dreambooth_path", "lora_model_path", "lora_alpha", "motion_module", "motion_module_lora_configs",
              "adapter_lora_path", "adapter_lora_scale", "domain_lora_scale", "inference_config", "W", "H", "L",
              "seed", "steps", "guidance_scale", "prompt", "n_prompt",
              "random_seed",  # written by the original (and by us) into the config.yaml beside the videos
              *SPARSECTRL_KEYS}
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SparseCtrlKeys:
    """An entry's SparseCtrl: the model file, its keyframe images and the frames they go to."""

    model: Path
    images: tuple[Path, ...]
    indices: tuple[int, ...]
    normalize: bool = False  # normalize_condition_images: grey, stretched to [0, 1]

    def pipeline_options(self, width: int, height: int) -> dict[str, Any]:
        return {"sparsectrl_images": [_keyframe(path, width, height, self.normalize) for path in self.images],
                "sparsectrl_frame_indices": list(self.indices)}


def _keyframe(path: Path, width: int, height: int, normalize: bool):
    """The original's keyframe transform: the largest centred crop of the W/H aspect ratio, resized to W x H
    (RandomResizedCrop with scale (1, 1)); optionally grey and stretched to the full range."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    ratio = width / height
    crop_w, crop_h = (image.width, round(image.width / ratio)) if image.width / image.height < ratio else \
        (round(image.height * ratio), image.height)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BILINEAR)
    if normalize:
        grey = np.asarray(image, dtype=np.float32).mean(axis=2)
        grey = (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-8)
        image = Image.fromarray((np.repeat(grey[..., None], 3, axis=2) * 255).round().astype(np.uint8))
    return image


@dataclass
class Job:
    """One entry with one motion module: the models, and one (prompt, negative, seed) per video."""

    where: str  # "entry 2 (ZoomIn)" for messages
    entry: dict  # the entry as read, where random_seed is recorded
    base: Path | None  # None: SD 1.5 from the models folder (the original's --pretrained-model-path)
    motion: Path
    loras: list[tuple[Path, float]]
    width: int
    height: int
    frames: int
    steps: int | None
    cfg_scale: float | None
    sampler_options: dict[str, Any]
    sparsectrl: SparseCtrlKeys | None = None
    videos: list[tuple[str, str, int]] = field(default_factory=list)  # (prompt, negative, seed or -1)


def read_config(path: str | os.PathLike) -> tuple[Any, list[tuple[str, dict]]]:
    """The YAML document and its entries as (label, mapping), in order, for either format."""
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if isinstance(document, list):
        entries = [(f"entry {i}", entry) for i, entry in enumerate(document)]
    elif isinstance(document, dict):
        entries = [(f"entry {name!r}", entry) for name, entry in document.items()]
    else:
        raise ConfigError(f"{path}: an AnimateDiff prompt config is a list of entries (or, before December 2023, a "
                          f"mapping of named entries); this file holds {type(document).__name__}")
    for label, entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: {label} must be a mapping of keys (dreambooth_path, prompt, ...), "
                              f"got {type(entry).__name__}")
    return document, entries


def plan_jobs(path: str | os.PathLike, *, width: int | None = None, height: int | None = None,
              frames: int | None = None, steps: int | None = None) -> tuple[Any, list[Job]]:
    """Check every entry of the config and turn it into jobs; raises before anything is loaded."""
    document, entries = read_config(path)
    jobs: list[Job] = []
    for label, entry in entries:
        where = f"{path}: {label}"
        if unknown := sorted(set(entry) - KNOWN_KEYS):
            logger.warning("%s: ignoring unknown keys %s (the original script ignores them too)", where,
                           ", ".join(map(str, unknown)))
        modules = entry.get("motion_module")
        modules = [modules] if isinstance(modules, str) else modules
        if not modules or not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
            raise ConfigError(f"{where}: motion_module must name a motion module file (or, in the old format, a list "
                              f"of them), got {entry.get('motion_module')!r}")
        common = _models_and_settings(entry, where, width, height, frames, steps)
        common["sparsectrl"] = _sparsectrl(entry, where, common["frames"])
        videos = _videos(entry, where)
        for module in modules:
            motion = _existing(module, "motion_module", where)
            jobs.append(Job(where, entry, motion=motion, videos=videos, **common))
    return document, jobs


def _models_and_settings(entry: dict, where: str, width, height, frames, steps) -> dict:
    base_text = _text(entry, "dreambooth_path", where)
    loras: list[tuple[Path, float]] = []
    if lora := _text(entry, "lora_model_path", where):
        loras.append((_existing(lora, "lora_model_path", where), _number(entry, "lora_alpha", 0.8, where)))
    configs = entry.get("motion_module_lora_configs") or []
    if not isinstance(configs, list):
        raise ConfigError(f"{where}: motion_module_lora_configs must be a list of {{path, alpha}}, got {configs!r}")
    for i, item in enumerate(configs):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise ConfigError(f"{where}: motion_module_lora_configs[{i}] must be {{path: FILE, alpha: WEIGHT}}, "
                              f"got {item!r}")
        key = f"motion_module_lora_configs[{i}].path"
        loras.append((_existing(item["path"], key, where), _number(item, "alpha", 1.0, where)))
    if adapter := _text(entry, "adapter_lora_path", where):
        scale_key = "adapter_lora_scale"
        if "adapter_lora_scale" not in entry and "domain_lora_scale" in entry:
            logger.warning("%s: domain_lora_scale is read as adapter_lora_scale (the original script never read it "
                           "and used 1.0; vidsynth now honours it)", where)
            scale_key = "domain_lora_scale"
        loras.append((_existing(adapter, "adapter_lora_path", where), _number(entry, scale_key, 1.0, where)))
    return {
        "base": _existing(base_text, "dreambooth_path", where) if base_text else None,
        "loras": loras,
        "width": width or _int(entry, "W", 512, where),
        "height": height or _int(entry, "H", 512, where),
        "frames": frames or _int(entry, "L", 16, where),
        "steps": steps or (_int(entry, "steps", None, where)),
        "cfg_scale": _number(entry, "guidance_scale", None, where),
        "sampler_options": inference_settings(entry.get("inference_config", DEFAULT_INFERENCE_CONFIG), where),
    }


def _sparsectrl(entry: dict, where: str, frames: int) -> SparseCtrlKeys | None:
    path = _text(entry, "controlnet_path", where)
    if not path:
        return None
    if not _text(entry, "controlnet_config", where):
        raise ConfigError(f"{where}: controlnet_path needs controlnet_config too (the original asserts it); vidsynth "
                          "reads the model's layout off its tensors, so any of the original's sparsectrl/*.yaml will do")
    images = entry.get("controlnet_images")
    images = [images] if isinstance(images, str) else images
    if not images or not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise ConfigError(f"{where}: controlnet_path needs controlnet_images, a list of keyframe image files")
    if len(images) > frames:
        raise ConfigError(f"{where}: {len(images)} controlnet_images for a {frames}-frame video (L); give at most "
                          f"{frames} or raise --L")
    indices = entry.get("controlnet_image_indexs", [0])
    if not isinstance(indices, list) or len(indices) != len(images) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ConfigError(f"{where}: controlnet_image_indexs must list one frame index per controlnet_images entry "
                          f"({len(images)}), got {indices!r}")
    if outside := [i for i in indices if not -frames <= i < frames]:
        raise ConfigError(f"{where}: controlnet_image_indexs {outside} lie outside the {frames}-frame video (L); "
                          f"raise --L to at least {max(max(indices) + 1, -min(indices))}")
    return SparseCtrlKeys(_existing(path, "controlnet_path", where),
                          tuple(_existing(image, "controlnet_images", where) for image in images), tuple(indices),
                          bool(entry.get("normalize_condition_images", False)))


def inference_settings(name: Any, where: str) -> dict[str, Any]:
    """Sampler settings for an ``inference_config``: the file's noise_scheduler_kwargs where it exists (over
    DDIMScheduler's defaults, as the original passes them), else those of the original config of that name."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: inference_config must name a file like configs/inference/inference-v3.yaml")
    if Path(name).is_file():
        try:
            kwargs = (yaml.safe_load(Path(name).read_text(encoding="utf-8")) or {}).get("noise_scheduler_kwargs") or {}
        except (yaml.YAMLError, AttributeError) as e:
            raise ConfigError(f"{where}: inference_config {name}: not an inference config ({e})") from None
        return {"sampler": "ddim", **DDIM_DEFAULTS, **{k: v for k, v in kwargs.items() if k in SCHEDULER_KEYS}}
    stem = Path(name).stem
    if stem not in INFERENCE_CONFIGS:
        raise ConfigError(f"{where}: inference_config {name!r} is neither a file nor one of the original configs "
                          f"({', '.join(sorted(INFERENCE_CONFIGS))})")
    return {"sampler": "ddim", **INFERENCE_CONFIGS[stem]}


def _videos(entry: dict, where: str) -> list[tuple[str, str, int]]:
    prompts = entry.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not prompts or not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{where}: prompt must be a list of prompts, got {entry.get('prompt')!r}")
    negatives = entry.get("n_prompt", [""])
    negatives = [negatives] if isinstance(negatives, str) else negatives
    if not negatives or not isinstance(negatives, list) or not all(isinstance(p, str) for p in negatives):
        raise ConfigError(f"{where}: n_prompt must be a list of negative prompts, got {entry.get('n_prompt')!r}")
    negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    seeds = entry.get("seed", [-1])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and (s == -1 or 0 <= s <= MAX_SEED) for s in seeds):
        raise ConfigError(f"{where}: seed must be an integer in [0, 2^64-1] or -1 (random), or a list of them; got "
                          f"{entry.get('seed')!r}")
    seeds = seeds * len(prompts) if len(seeds) == 1 else seeds
    if not len(prompts) == len(negatives) == len(seeds):
        logger.warning("%s: %d prompts, %d negative prompts and %d seeds: only the first %d are rendered, as the "
                       "original pairs them", where, len(prompts), len(negatives), len(seeds),
                       min(len(prompts), len(negatives), len(seeds)))
    return list(zip(prompts, negatives, seeds))


def _text(entry: dict, key: str, where: str) -> str:
    value = entry.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a path (or \"\"), got {value!r}")
    return value


def _existing(path: str, key: str, where: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{where}: {key} {path!r} is not a file (looked at {file.resolve()}); paths are relative to "
                          f"the working directory {Path.cwd()}, as in the original: run from the folder the config "
                          "expects or fix the path")
    return file


def _number(entry: dict, key: str, default, where: str):
    value = entry.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    return value


def _int(entry: dict, key: str, default, where: str):
    value = entry.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def video_name(index: int, prompt: str, suffix: str) -> str:
    """The original's sample name: index, then the first ten words of the prompt joined by '-', '/' removed."""
    return f"{index}-{'-'.join(prompt.replace('/', '').split(' ')[:10])}.{suffix}"


def run_config(path: str | os.PathLike, *, width: int | None = None, height: int | None = None,
               frames: int | None = None, steps: int | None = None, video_format: str = "gif", fps: float = 8.0,
               output_dir: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
               device: str | None = None, dtype: str | None = None, progress_bar: bool = True) -> list[Path]:
    """Render every prompt of an AnimateDiff prompt config; returns the videos written, then the config.yaml."""
    from .download import locate_models
    from .recipe import Recipe
    from .render import ModelSession, model_refs, render, save

    document, jobs = plan_jobs(path, width=width, height=height, frames=frames, steps=steps)
    if any(job.base is None for job in jobs):
        default_base = locate_models(["StableDiffusion_v15"], models_dir, what="an empty dreambooth_path")[0]
    time_str = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    out_dir = Path(output_dir) if output_dir is not None else Path("samples") / f"{Path(path).stem}-{time_str}"
    out_dir.mkdir(parents=True, exist_ok=True)
    session = ModelSession(device, dtype)
    written: list[Path] = []
    seeds_used: dict[int, list[int]] = {}
    for job in jobs:
        sampler_options = dict(job.sampler_options)
        sampler = sampler_options.pop("sampler")
        for prompt, negative, seed in job.videos:
            seed = secrets.randbits(64) if seed == -1 else seed
            seeds_used.setdefault(id(job.entry), []).append(seed)
            recipe = Recipe(prompt=prompt, negative_prompt=negative, seed=seed, sampler=sampler, steps=job.steps,
                            cfg_scale=job.cfg_scale, width=job.width, height=job.height, frames=job.frames, fps=fps,
                            sampler_options=sampler_options,
                            **model_refs(job.base or default_base, job.motion, job.loras))
            logger.info("%s: seed %d, sampling %s", job.where, seed, prompt)
            options = {}
            if job.sparsectrl is not None:
                session.pipeline(recipe.base.path, job.motion, [], None, extra=[job.sparsectrl.model])
                options = job.sparsectrl.pipeline_options(job.width, job.height)
            video, done = render(recipe, session, progress_bar=progress_bar, pipeline_options=options)
            written.append(save(video, out_dir / video_name(len(written), prompt, video_format), done))
    for job in jobs:
        job.entry["random_seed"] = seeds_used.get(id(job.entry), [])
    config_out = out_dir / "config.yaml"
    partial = out_dir / ".config.yaml.partial"
    partial.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(partial, config_out)
    return [*written, config_out]
