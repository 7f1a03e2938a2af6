"""Video-caption datasets: a folder of videos (or frame folders) with captions in a CSV or JSONL file.

Every entry is checked before training (caption present, file readable, enough frames); bad ones are reported by
path and left out (``on_bad_data="skip"``) or refused up front (``"error"``). An item is drawn by ``(index, seed)``
so that the clip's start frame depends only on the seed: runs and resumed runs see the same clips.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError, VidsynthError
from ..video_io import IMAGE_SUFFIXES, PILLOW_FORMATS, AV_CODECS, load_video, video_info

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {*AV_CODECS, *PILLOW_FORMATS, ".mov", ".mkv", ".avi"}
PATH_COLUMNS = ("path", "file", "video", "videoid", "video_path")
CAPTION_COLUMNS = ("caption", "text", "name", "prompt")


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    num_frames: int


@dataclass(frozen=True)
class BadData:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def read_captions(file: Path) -> list[tuple[str, str | None]]:
    """``(path, caption)`` rows of a CSV (with a header) or JSONL file; a missing caption is ``None``."""
    if not file.is_file():
        raise ConfigError(f"caption file {str(file)!r} does not exist; give `captions:` a CSV or JSONL file")
    if file.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{file}, line {n}: not valid JSON ({err})") from None
    else:
        with file.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel writes a byte-order mark
            rows = list(csv.DictReader(handle))
    if not rows:
        return []
    not_objects = [n for n, row in enumerate(rows, 1) if not isinstance(row, dict)]
    if not_objects:
        raise ConfigError(f"{file}: rows {not_objects[:5]} are not objects with a path and a caption")
    columns = {str(c) for row in rows for c in row}
    path_key = next((c for c in PATH_COLUMNS if c in columns), None)
    caption_key = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if path_key is None or caption_key is None:
        raise ConfigError(f"{file}: needs a path column ({'/'.join(PATH_COLUMNS)}) and a caption column "
                          f"({'/'.join(CAPTION_COLUMNS)}); found {sorted(columns)}")
    out = []
    for row in rows:
        caption = row.get(caption_key)
        caption = str(caption).strip() if caption is not None else ""
        out.append((str(row.get(path_key) or ""), caption or None))
    return out


def _resolve(root: Path, name: str) -> Path:
    path = root / name
    if path.exists() or path.suffix:
        return path
    # WebVid lists video ids without an extension
    return next((p for p in (path.with_suffix(s) for s in sorted(VIDEO_SUFFIXES)) if p.exists()), path)


def _is_video(path: Path) -> bool:
    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
    return path.suffix.lower() in VIDEO_SUFFIXES


def scan(root: str | Path, captions: str | Path | None, frames: int) -> tuple[list[Sample], list[BadData]]:
    """Pair every video of ``root`` with its caption and check it; returns (good samples, bad entries)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data_root {str(root)!r} is not a folder; point it at the folder of training videos")
    if captions is None:
        found = [root / n for n in ("captions.csv", "captions.jsonl") if (root / n).is_file()]
        if not found:
            raise ConfigError(f"no caption file given and none in {root} (captions.csv or captions.jsonl); "
                              f"set `captions:` to a CSV or JSONL file with path,caption")
        captions = found[0]
    captions = Path(captions)
    rows = read_captions(captions)
    listed: dict[Path, str | None] = {}
    bad: list[BadData] = []
    first_row = 1 if captions.suffix.lower() in (".jsonl", ".json") else 2  # a CSV's line 1 is its header
    for n, (name, caption) in enumerate(rows, first_row):
        if not name.strip():
            bad.append(BadData(captions, f"line {n}: empty path (caption {caption!r})"))
            continue
        listed[_resolve(root, name).resolve()] = caption
    for path in sorted(p.resolve() for p in root.iterdir() if _is_video(p)):
        if path not in listed:
            bad.append(BadData(path, "no caption: the file is not listed in the caption file"))
    good: list[Sample] = []
    for path, caption in listed.items():
        if caption is None:
            bad.append(BadData(path, "missing caption (empty caption field)"))
            continue
        if not path.exists():
            bad.append(BadData(path, "listed in the caption file but does not exist"))
            continue
        try:
            count = int(video_info(path)["frames"] or 0)
        except Exception as err:  # any decoder failure means the same to training: unusable file
            bad.append(BadData(path, f"unreadable: {err}"))
            continue
        if count < frames:
            bad.append(BadData(path, f"too short: {count} frame(s), a clip needs {frames}"))
            continue
        good.append(Sample(path, caption, count))
    return good, bad


def clip_indices(num_frames: int, frames: int, stride: int, rng: random.Random) -> list[int]:
    """Frame indices of one clip: ``frames`` frames ``stride`` apart from a random start; a video too short for the
    stride is sampled evenly over its whole length (as AnimateDiff's WebVid loader does)."""
    span = (frames - 1) * stride + 1
    if num_frames >= span:
        start = rng.randint(0, num_frames - span)
        return list(range(start, start + span, stride))
    return np.linspace(0, num_frames - 1, frames).round().astype(int).tolist()


def to_tensor(images, height: int, width: int) -> torch.Tensor:
    """PIL frames -> ``(f, 3, height, width)`` in [-1, 1]: resized so they cover the size, then centre-cropped."""
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return (x[:, :, top:top + height, left:left + width] / 127.5 - 1).clamp(-1, 1)


def posterior(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior of images ``(n, 3, H, W)``: ``(n, 2*latent, h, w)``, mean then standard deviation."""
    p = vae.quant_conv.weight
    mean, logvar = vae.quant_conv(vae.encoder(pixels.to(p.device, p.dtype))).chunk(2, dim=1)
    return torch.cat([mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))], dim=1)


class VideoClipDataset(Dataset):
    """Clips of ``frames`` frames; ``dataset[(index, seed)]`` -> ``{"pixels" or "moments" (cached posterior),
    "caption", "path", "seed"}``."""

    def __init__(self, root: str | Path, captions: str | Path | None = None, *, frames: int = 16, stride: int = 4,
                 size: tuple[int, int] = (256, 256), on_bad_data: str = "skip"):
        self.frames, self.stride, self.size = frames, stride, tuple(size)
        self.samples, self.bad = scan(root, captions, frames)
        self.cache: LatentCache | None = None
        if self.bad:
            report = "\n  ".join(map(str, self.bad))
            if on_bad_data == "error":
                raise ConfigError(f"{len(self.bad)} bad training entr{'y' if len(self.bad) == 1 else 'ies'} "
                                  f"(set on_bad_data: skip to leave them out):\n  {report}")
            log.warning("skipping %d bad training entries:\n  %s", len(self.bad), report)
        if not self.samples:
            raise ConfigError(f"no usable training videos in {root} ({len(self.bad)} bad entries)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        for attempt in range(len(self.samples)):  # a file that broke after the scan: report it, take the next one
            sample = self.samples[(index + attempt) % len(self.samples)]
            try:
                return {**self.load(sample, random.Random(seed)), "seed": seed}
            except (VidsynthError, OSError, ValueError, RuntimeError) as err:
                log.warning("skipping %s: unreadable during training: %s", sample.path, err)
        raise VidsynthError("no training video could be read (see the warnings above)")

    def load(self, sample: Sample, rng: random.Random) -> dict:
        if self.cache is not None:
            moments = self.cache.load(sample)
            indices = clip_indices(moments.shape[0], self.frames, self.stride, rng)
            return {"moments": moments[indices].float(), "caption": sample.caption, "path": str(sample.path)}
        indices = clip_indices(sample.num_frames, self.frames, self.stride, rng)
        images = load_video(sample.path, max_frames=indices[-1] + 1)
        if len(images) <= indices[-1]:
            raise VidsynthError(f"decoded only {len(images)} of {sample.num_frames} frames")
        pixels = to_tensor([images[i] for i in indices], *self.size)
        return {"pixels": pixels, "caption": sample.caption, "path": str(sample.path)}


def collate(items: list[dict]) -> dict:
    key = "moments" if "moments" in items[0] else "pixels"
    return {key: torch.stack([item[key] for item in items]), "caption": [item["caption"] for item in items],
            "path": [item["path"] for item in items], "seed": [item["seed"] for item in items]}


class LatentCache:
    """Per-video VAE posteriors of all frames (:func:`posterior`: mean and standard deviation, unscaled), one file
    per video under ``folder``; training samples from them afresh at every draw. The file name hashes the video's
    path, size and time, the frame size, the VAE's weights and the format, so a change re-encodes."""

    FORMAT = "posterior-v2"  # v1 stored only the mean

    def __init__(self, folder: str | Path, vae, size: tuple[int, int], batch: int = 16):
        self.folder, self.vae, self.size, self.batch = Path(folder), vae, tuple(size), batch
        digest = hashlib.sha1()
        for tensor in (vae.encoder.conv_in.weight, vae.quant_conv.weight):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        self.vae_id = digest.hexdigest()[:16]

    def file(self, sample: Sample) -> Path:
        stat = sample.path.stat()
        key = f"{sample.path}|{stat.st_size}|{stat.st_mtime_ns}|{self.size}|{self.vae_id}|{self.FORMAT}"
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"

    @torch.no_grad()
    def build(self, samples: list[Sample]) -> int:
        """Encode the samples not cached yet; returns how many were encoded."""
        self.folder.mkdir(parents=True, exist_ok=True)
        encoded = 0
        for sample in samples:
            out = self.file(sample)
            if out.exists():
                continue
            images = load_video(sample.path)  # decoded frames stay uint8; only one chunk at a time is float
            latents = torch.cat([posterior(self.vae, to_tensor(images[i:i + self.batch], *self.size)).float().cpu()
                                 for i in range(0, len(images), self.batch)])
            tmp = out.with_suffix(".tmp")
            torch.save(latents, tmp)
            tmp.replace(out)
            encoded += 1
        return encoded

    def load(self, sample: Sample) -> torch.Tensor:
        return torch.load(self.file(sample), map_location="cpu", weights_only=True)
