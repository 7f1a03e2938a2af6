"""A video's recipe: everything needed to render it again, kept inside the output file (see video_io's metadata).

``Recipe`` is what a user asks for (prompt, seed, models, ...). Once rendered, its defaults are filled in (sampler,
steps and cfg the motion module chose) and each model carries its file name and sha256, so ``vidsynth inspect``
shows what made a video and ``vidsynth generate --recipe VIDEO`` renders it again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, VidsynthError

logger = logging.getLogger(__name__)
FORMAT = "vidsynth-recipe/1"
_HASH_CHUNK = 8 << 20
_hashes: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class ModelRef:
    """One model file: where it was, its file name and its sha256 (None until hashed)."""

    path: str
    name: str = ""
    sha256: str | None = None
    alpha: float | None = None  # LoRAs: the weight; ControlNets: the scale
    processor: str | None = None  # ControlNets only: the preprocessor (canny, lineart, tile, none, ...)

    @classmethod
    def of(cls, path: str | os.PathLike, alpha: float | None = None, processor: str | None = None) -> "ModelRef":
        return cls(str(path), Path(path).name, None, alpha, processor)

    def hashed(self) -> "ModelRef":
        return self if self.sha256 else replace(self, sha256=file_sha256(self.path))


@dataclass(frozen=True)
class Recipe:
    prompt: str | dict[int, str]  # a dict: prompt travel ({frame: text})
    negative_prompt: str = ""
    seed: int = 0
    sampler: str | None = None  # None: the motion module's original setting
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None  # None: 512 (SD 1.5) / 1024 (SDXL)
    height: int | None = None
    frames: int = 16
    fps: float = 16
    base: ModelRef | None = None
    motion: ModelRef | None = None
    motion_version: str | None = None
    loras: tuple[ModelRef, ...] = ()
    context_length: int | None = None
    context_overlap: int = 4
    closed_loop: bool = False
    sampler_options: dict[str, Any] = field(default_factory=dict)  # SamplerConfig fields beyond the sampler's name
    input: ModelRef | None = None  # the video or image sampling started from (video-to-video / image-to-video)
    strength: float = 1.0  # denoising strength with an input: 1 starts from pure noise
    controlnets: tuple[ModelRef, ...] = ()  # each with its processor and scale
    control_frames: ModelRef | None = None  # the video (or frame folder) the ControlNets follow
    motion_scale: float | dict[int, float] = 1.0  # a dict: keyframes {frame: scale}
    free_noise: dict[str, Any] | None = None  # FreeNoise options ({} = the defaults); None: off
    free_init: dict[str, Any] | None = None  # FreeInit options, as free_noise
    vidsynth_version: str | None = None

    # ------------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def to_json(self) -> str:
        # ASCII only: EXIF text and some tag readers take nothing else; json.loads restores the characters
        return json.dumps(self.to_dict(), ensure_ascii=True, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{where}: not a vidsynth recipe (format {FORMAT!r} expected)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if unknown := sorted(set(data) - known - {"format"}):
            logger.warning("%s: ignoring recipe fields this vidsynth does not know: %s", where, ", ".join(unknown))
        try:
            for key in ("base", "motion", "input", "control_frames"):
                if values.get(key) is not None:
                    values[key] = ModelRef(**values[key])
            for key in ("loras", "controlnets"):
                values[key] = tuple(ModelRef(**ref) for ref in values.get(key) or ())
            values["sampler_options"] = dict(values.get("sampler_options") or {})
            for key in ("prompt", "motion_scale"):  # JSON keeps keyframe frames as strings
                if isinstance(values.get(key), dict):
                    values[key] = {int(k): v for k, v in values[key].items()}
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: malformed recipe ({e})") from None

    @classmethod
    def from_json(cls, text: str, where: str = "recipe") -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: the recipe is not valid JSON ({e})") from None
        return cls.from_dict(data, where)

    # ----------------------------------------------------------------------------------------------- helpers
    def hashed(self) -> "Recipe":
        """The recipe with every model file's sha256 filled in (each file read once per process)."""
        return replace(self, base=self.base and self.base.hashed(), motion=self.motion and self.motion.hashed(),
                       loras=tuple(lora.hashed() for lora in self.loras), input=self.input and self.input.hashed(),
                       controlnets=tuple(ref.hashed() for ref in self.controlnets),
                       control_frames=self.control_frames and self.control_frames.hashed())

    def describe(self) -> str:
        """A few readable lines, as `vidsynth inspect VIDEO` prints them."""
        lines = [f"prompt: {self.prompt}", f"negative prompt: {self.negative_prompt}",
                 f"seed: {self.seed}  sampler: {self.sampler}  steps: {self.steps}  cfg: {self.cfg_scale}",
                 f"size: {self.width}x{self.height}  frames: {self.frames}  fps: {self.fps:g}"]
        if self.context_length:
            lines.append(f"context: {self.context_length} frames, overlap {self.context_overlap}, "
                         f"loop {self.closed_loop}")
        if self.motion_scale != 1.0:
            lines.append(f"motion scale: {self.motion_scale}")
        for label, options in (("FreeNoise", self.free_noise), ("FreeInit", self.free_init)):
            if options is not None:
                lines.append(f"{label}: " + (", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"))
        if self.input is not None:
            lines.append(f"input: {self.input.name} (strength {self.strength:g})  sha256 {self.input.sha256}")
        for label, ref in (("base", self.base), ("motion module", self.motion)):
            if ref is not None:
                lines.append(f"{label}: {ref.name}  sha256 {ref.sha256}")
        for lora in self.loras:
            lines.append(f"lora: {lora.name} (weight {lora.alpha:g})  sha256 {lora.sha256}")
        for ref in self.controlnets:
            lines.append(f"controlnet: {ref.name} ({ref.processor}, scale {ref.alpha:g})  sha256 {ref.sha256}")
        if self.control_frames is not None:
            lines.append(f"control frames: {self.control_frames.name}  sha256 {self.control_frames.sha256}")
        if self.sampler_options:
            lines.append("sampler options: " + ", ".join(f"{k}={v}" for k, v in self.sampler_options.items()))
        lines.append(f"vidsynth: {self.vidsynth_version}")
        return "\n".join(lines)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (or folder of frames), cached per process by (real path, size, mtime)."""
    real = os.path.realpath(path)
    try:
        stat = os.stat(real)
    except OSError as e:
        raise VidsynthError(f"{path}: cannot read the model file to hash it ({e.strerror or e})") from None
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        folder = os.path.isdir(real)  # an input given as a folder of frames: each file's name, then its bytes
        for file in sorted(p for p in Path(real).iterdir() if p.is_file()) if folder else [Path(real)]:
            if folder:
                digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def find_model(ref: ModelRef, models_dir: str | os.PathLike | None, role: str) -> Path:
    """The local file for a recipe's model: its recorded path, else a file of that name under ``models_dir``. A file
    whose sha256 differs from the recorded one is used with a warning (the frames will differ)."""
    candidates = [Path(ref.path)]
    if models_dir is not None and ref.name:
        candidates += sorted(Path(models_dir).rglob(ref.name))
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise VidsynthError(f"the recipe's {role} {ref.name!r} (sha256 {ref.sha256}) is not at {ref.path} nor under "
                            f"{models_dir}; put the file at one of these places or pass --models-dir DIR")
    if ref.sha256 and file_sha256(found) != ref.sha256:
        logger.warning("%s: sha256 %s differs from the recipe's %s (%s); the video will not be the same",
                       found, file_sha256(found), ref.sha256, role)
    return found
