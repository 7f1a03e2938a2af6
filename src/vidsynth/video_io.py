"""Reading and writing videos: mp4 (H.264), webm (VP9), gif, animated webp, or a folder of PNG frames.

``save_video`` writes to a temporary sibling and renames it into place only when complete, so a failed or
interrupted save never leaves a partial file (or a temporary one) behind.
"""
from __future__ import annotations

import glob
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from fractions import Fraction
from itertools import islice
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageSequence

from .errors import ConfigError, VidsynthError

Frames = Sequence[Image.Image] | np.ndarray | torch.Tensor

AV_CODECS = {".mp4": ("mp4", "libx264", 51, 18), ".webm": ("webm", "libvpx-vp9", 63, 31)}  # format, codec, max crf, default crf
PILLOW_FORMATS = {".gif": "GIF", ".webp": "WEBP"}
SUPPORTED = "'.mp4', '.webm', '.gif', '.webp', or a path without extension / ending in '/' for a folder of PNG frames"
BT601_SMPTE170M, LIMITED_RANGE = 6, 1  # FFmpeg's AVCOL_PRI/TRC/SPC_SMPTE170M and AVCOL_RANGE_MPEG
FRAME_NAME = "frame_{:05d}.png"
EXIF_IMAGE_DESCRIPTION = 0x010E
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
OUT_OF_RANGE_SLACK = 1e-2  # decoders overshoot [0, 1] slightly; larger excursions mean the caller passed [-1, 1] or 0..255


def frames_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """The pipeline's decoded frames, a (f, 3, h, w) tensor in [-1, 1], as RGB images (values are clamped and rounded)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"frames_to_pil expects a (frames, 3, height, width) tensor, got {_describe(x)}")
    pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(frame) for frame in pixels]


def save_video(frames: Frames, path: str | os.PathLike, fps: float = 16, quality: int | None = None, *,
               loop: bool = True, comment: str | None = None) -> Path:
    """Write ``frames`` as a video chosen by the extension of ``path``; returns the path written.

    frames: a sequence of equal-size PIL images; a (f, h, w, 3) numpy array, uint8 or float in [0, 1]; or a
    (f, 3, h, w) / (f, h, w, 3) tensor, uint8 or float in [0, 1] (for the pipeline's [-1, 1] use ``frames_to_pil``).
    quality: 0 (smallest) .. 10 (best), as in DiffSynth/imageio; mapped to crf = (1 - quality/10) * max crf for
    mp4/webm and to Pillow quality 10*quality for webp; None means crf 18 (mp4), crf 31 (webm), webp quality 90.
    gif (a 256-colour palette per frame) and png ignore it.
    loop: gif/webp repeat forever, or play once; video containers have no such flag and ignore it.

    .mp4 is H.264 (libx264, yuv420p) and .webm is VP9, both playable everywhere. yuv420p needs even sizes, so an odd
    width or height is padded by one repeated edge column/row (a 33x17 video is stored as 34x18; nothing is cut).
    gif frame times are whole centiseconds: they alternate so the average rate is ``fps``; Pillow merges identical
    consecutive gif/webp frames into one longer frame, so such files can hold fewer frames with the same playback.
    A folder of PNG frames (frame_00000.png, ...) stores fps in each PNG's text chunk; an existing folder is
    replaced only if it holds nothing but such frames. Missing parent folders are created.
    comment: text stored in the file, read back by ``read_comment``: the "comment" tag of mp4 / webm, the GIF
    comment extension, EXIF ImageDescription of webp (ASCII only there), a "Comment" text chunk in every PNG frame.
    """
    out = Path(path)
    to_folder = str(path).endswith(("/", os.sep)) or out.suffix == ""
    suffix = out.suffix.lower()
    if not to_folder and suffix not in AV_CODECS and suffix not in PILLOW_FORMATS:
        raise ConfigError(f"cannot write video {str(path)!r}: unknown extension {out.suffix!r}; use {SUPPORTED}")
    if not (isinstance(fps, (int, float, Fraction)) and math.isfinite(fps) and fps > 0):
        raise ConfigError(f"fps must be a positive finite number, got {fps!r}")
    if comment is not None and not isinstance(comment, str):
        raise ConfigError(f"comment must be a string or None, got {type(comment).__name__}")
    if comment is not None and suffix == ".webp" and not comment.isascii():
        raise ConfigError("a webp comment (EXIF ImageDescription) must be ASCII; escape it (json.dumps does)")
    if quality is not None and not (isinstance(quality, (int, float)) and 0 <= quality <= 10):
        raise ConfigError(f"quality must be between 0 (smallest file) and 10 (best) or None, got {quality!r}")
    height, width, arrays = _frame_arrays(frames)
    if to_folder and out.is_file():
        raise VidsynthError(f"cannot write PNG frames to {str(out)!r}: it is an existing file; choose a folder path")
    if not to_folder and out.is_dir():
        raise VidsynthError(f"cannot write video to {str(out)!r}: it is an existing folder; give a file name")

    created = _make_parents(out.parent)
    try:
        if to_folder:
            _atomic_folder(out, lambda tmp: _write_png_folder(tmp, arrays, fps, comment))
        elif suffix in AV_CODECS:
            _atomic_file(out, lambda tmp: _write_av(tmp, arrays, width, height, fps, quality, comment,
                                                    *AV_CODECS[suffix]))
        else:
            _atomic_file(out, lambda tmp: _write_pillow(tmp, arrays, fps, quality, loop, comment,
                                                        PILLOW_FORMATS[suffix]))
    except BaseException:
        for folder in reversed(created):  # leave the file system as it was
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return out


def load_video(path: str | os.PathLike, *, max_frames: int | None = None) -> list[Image.Image]:
    """The frames of a video file (PyAV), gif/webp (Pillow), or folder of images (sorted by name, numbers in
    natural order), as RGB images; at most ``max_frames`` of them from the start."""
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ConfigError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    src = _existing(path)
    if src.is_dir():
        return [_read_image(f).convert("RGB") for f in _image_files(src)[:max_frames]]
    if src.suffix.lower() in PILLOW_FORMATS:
        with _open_pillow(src) as im:
            return [frame.convert("RGB") for frame in islice(ImageSequence.Iterator(im), max_frames)]
    with _open_av(src) as container:
        return [frame.to_image() for frame in islice(container.decode(video=0), max_frames)]


def read_comment(path: str | os.PathLike) -> str | None:
    """The text ``save_video(..., comment=)`` stored in a video file, gif/webp or folder of PNG frames, or None."""
    src = _existing(path)
    if src.is_dir():
        return _read_image(_image_files(src)[0]).info.get("Comment")
    suffix = src.suffix.lower()
    if suffix == ".gif":
        with _open_pillow(src) as im:
            text = im.info.get("comment")
            return text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    if suffix == ".webp":
        with _open_pillow(src) as im:
            return im.getexif().get(EXIF_IMAGE_DESCRIPTION)
    with _open_av(src) as container:
        tags = {key.lower(): value for key, value in container.metadata.items()}  # matroska upper-cases them
        return tags.get("comment")


def video_info(path: str | os.PathLike) -> dict[str, int | float | None]:
    """``{"frames", "width", "height", "fps"}`` of a video file, gif/webp or folder of frames; fps is None for a
    folder whose frames carry no fps."""
    src = _existing(path)
    if src.is_dir():
        files = _image_files(src)
        first = _read_image(files[0])
        fps = first.info.get("fps")
        return {"frames": len(files), "width": first.width, "height": first.height,
                "fps": float(fps) if fps else None}
    if src.suffix.lower() in PILLOW_FORMATS:
        with _open_pillow(src) as im:
            durations = [_loaded(frame).info.get("duration", 0) for frame in ImageSequence.Iterator(im)]
            total = sum(durations)
            return {"frames": len(durations), "width": im.width, "height": im.height,
                    "fps": 1000 * len(durations) / total if total else None}
    with _open_av(src) as container:
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)  # webm has no count
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return {"frames": frames, "width": stream.codec_context.width, "height": stream.codec_context.height,
                "fps": float(rate) if rate else None}


def _frame_arrays(frames: Frames) -> tuple[int, int, Iterator[np.ndarray]]:
    """Validate ``frames`` up front; returns (height, width, iterator of (h, w, 3) uint8 frames) so that long
    videos are converted one frame at a time."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim == 4 and frames.shape[1] == 3 and frames.shape[-1] != 3:
            frames = frames.permute(0, 2, 3, 1)
        frames = frames.detach().cpu()
        frames = frames.numpy() if frames.dtype == torch.uint8 else frames.float().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise ConfigError(f"video frames must be (frames, height, width, 3), got an array of shape {frames.shape}")
        if frames.dtype != np.uint8:
            if not np.issubdtype(frames.dtype, np.floating):
                raise ConfigError(f"video frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
            low, high = float(frames.min()), float(frames.max())
            if not (low >= -OUT_OF_RANGE_SLACK and high <= 1 + OUT_OF_RANGE_SLACK):  # also catches NaN
                raise ConfigError(f"float video frames must be in [0, 1], got values in [{low}, {high}]; map [-1, 1] "
                                  "with (x + 1) / 2 (or use frames_to_pil) and 0..255 with x / 255")
        array = frames
        convert = (lambda f: f) if array.dtype == np.uint8 else (lambda f: (np.clip(f, 0, 1) * 255 + 0.5).astype(np.uint8))
        return array.shape[1], array.shape[2], (np.ascontiguousarray(convert(f)) for f in array)
    try:
        images = [] if isinstance(frames, (str, bytes)) else list(frames)
    except TypeError:
        images = []
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise ConfigError(f"video frames must be a non-empty sequence of PIL images, a numpy array or a tensor, "
                          f"got {_describe(frames)}")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ConfigError(f"all video frames must have the same size, got sizes {sorted(sizes)}")
    width, height = images[0].size
    return height, width, (np.asarray(im.convert("RGB")) for im in images)


def _write_av(tmp: Path, arrays: Iterator[np.ndarray], width: int, height: int, fps: float, quality: float | None,
              comment: str | None, container_format: str, codec: str, max_crf: int, default_crf: int) -> None:
    crf = default_crf if quality is None else round((1 - quality / 10) * max_crf)
    pad_h, pad_w = height % 2, width % 2
    with av.open(str(tmp), mode="w", format=container_format) as container:
        if comment is not None:
            container.metadata["comment"] = comment
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width + pad_w, height + pad_h, "yuv420p"
        context = stream.codec_context  # PyAV converts RGB with BT.601 limited range; say so, or players may guess BT.709
        context.color_primaries = context.color_trc = context.colorspace = BT601_SMPTE170M
        context.color_range = LIMITED_RANGE
        stream.options = {"crf": str(crf)} | ({"b": "0", "row-mt": "1", "cpu-used": "4"} if codec == "libvpx-vp9" else {})
        for index, array in enumerate(arrays):
            if pad_h or pad_w:
                array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_pillow(tmp: Path, arrays: Iterator[np.ndarray], fps: float, quality: float | None, loop: bool,
                  comment: str | None, image_format: str) -> None:
    images = [Image.fromarray(a) for a in arrays]
    tick = 10 if image_format == "GIF" else 1  # gif stores whole centiseconds, webp milliseconds
    ends = [round(i * 1000 / fps / tick) * tick for i in range(len(images) + 1)]
    durations = [max(tick, b - a) for a, b in zip(ends, ends[1:])]  # cumulative rounding keeps the mean rate exact
    options: dict = {"save_all": True, "append_images": images[1:], "duration": durations}
    if image_format == "GIF":
        options |= {"loop": 0} if loop else {}  # no loop extension = play once
        options |= {"comment": comment.encode("utf-8")} if comment is not None else {}
    else:
        options |= {"loop": 0 if loop else 1, "quality": 90 if quality is None else round(quality * 10)}
        if comment is not None:
            exif = Image.Exif()
            exif[EXIF_IMAGE_DESCRIPTION] = comment
            options["exif"] = exif.tobytes()
    images[0].save(tmp, format=image_format, **options)


def _write_png_folder(folder: Path, arrays: Iterator[np.ndarray], fps: float, comment: str | None) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("fps", repr(float(fps)))
    if comment is not None:
        info.add_text("Comment", comment, zip=True)
    for index, array in enumerate(arrays):
        Image.fromarray(array).save(folder / FRAME_NAME.format(index), format="PNG", pnginfo=info)


def _temporary_prefix(out: Path) -> str:
    """Temporaries carry the writer's pid, so a later write can tell those of a killed writer from a live one's."""
    return f".{out.name}.{os.getpid()}."


def _remove_stale_temporaries(out: Path) -> None:
    """Delete what writers of ``out`` that were killed mid-write (SIGKILL, power loss) left next to it."""
    ours = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\..*\.(partial{re.escape(out.suffix)}|old)")
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.*"):
        match = ours.fullmatch(leftover.name)
        if match and not _process_alive(int(match[1])):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def _atomic_file(out: Path, write) -> None:
    _remove_stale_temporaries(out)
    try:
        handle, name = tempfile.mkstemp(dir=out.parent, prefix=_temporary_prefix(out), suffix=f".partial{out.suffix}")
    except OSError as error:
        raise VidsynthError(f"cannot write video {str(out)!r}: {error.strerror or error}; choose a writable folder") from error
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_folder(out: Path, write) -> None:
    _remove_stale_temporaries(out)
    old = [p for p in out.iterdir()] if out.is_dir() else []
    if any(not re.fullmatch(r"frame_\d{5}\.png", p.name) or not p.is_file() for p in old):
        raise VidsynthError(f"cannot write PNG frames to {str(out)!r}: the folder exists and holds other files; "
                            "choose a new or empty folder")
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_temporary_prefix(out), suffix=".partial"))
    except OSError as error:
        raise VidsynthError(f"cannot write PNG frames to {str(out)!r}: {error.strerror or error}; "
                            "choose a writable folder") from error
    try:
        write(tmp)
        if old:  # move the previous frames aside first: a folder cannot be replaced while it has files
            retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=_temporary_prefix(out), suffix=".old"))
            os.replace(out, retired)
            os.replace(tmp, out)
            shutil.rmtree(retired)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; returns the folders created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VidsynthError(f"cannot create the folder {str(folder)!r} for the video: {error.strerror or error}; "
                            "choose a writable location") from error
    return missing


def _existing(path: str | os.PathLike) -> Path:
    src = Path(path)
    if not src.exists():
        raise VidsynthError(f"video {str(src)!r} does not exist")
    return src


def _image_files(folder: Path) -> list[Path]:
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=natural)
    if not files:
        raise VidsynthError(f"{str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _read_image(file: Path) -> Image.Image:
    try:
        with Image.open(file) as im:
            return im.copy()  # copy loads the pixels and keeps the text chunks (fps)
    except (OSError, SyntaxError) as error:
        raise VidsynthError(f"cannot read image {str(file)!r}: {error}") from error


def _loaded(frame: Image.Image) -> Image.Image:
    frame.load()  # webp sets a frame's duration only when it is decoded
    return frame


def _open_pillow(src: Path) -> Image.Image:
    try:
        return Image.open(src)
    except (OSError, SyntaxError) as error:
        raise VidsynthError(f"cannot read {str(src)!r} as {src.suffix[1:]}: {error}") from error


def _open_av(src: Path):
    try:
        container = av.open(str(src))
    except av.FFmpegError as error:
        raise VidsynthError(f"cannot read video {str(src)!r}: {error}") from error
    if not container.streams.video:
        container.close()
        raise VidsynthError(f"{str(src)!r} has no video stream")
    return container


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else type(x).__name__
