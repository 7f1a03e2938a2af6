"""DiffSynth-Studio's ``VideoData`` (frames of a video file or image folder, read on demand, fitted to a size) and
``save_frames``."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from .errors import ConfigError
from .video_io import _existing, _image_files, _open_av, _read_image, video_info


def crop_and_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre crop to the aspect ratio of width x height, then resize to it (DiffSynth's fit)."""
    w, h = image.size
    if h * width > w * height:  # too tall: keep the full width
        crop = round(w * height / width)
        top = (h - crop) // 2
        image = image.crop((0, top, w, top + crop))
    elif h * width < w * height:  # too wide: keep the full height
        crop = round(h * width / height)
        left = (w - crop) // 2
        image = image.crop((left, 0, left + crop, h))
    return image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image


class _VideoFileFrames:
    """Frames of a video file decoded forward on demand; going back reopens the file. Holds one frame at a time."""

    def __init__(self, path: Path):
        self.path, self.count = path, video_info(path)["frames"]
        self._container = self._frames = None
        self._next = 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Image.Image:
        if index < self._next or self._frames is None:
            self._reopen()
        frame = None
        while self._next <= index:
            frame = next(self._frames, None)
            if frame is None:
                raise IndexError(f"{self.path} has no frame {index} (it holds {self._next})")
            self._next += 1
        return frame.to_image()

    def _reopen(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = _open_av(self.path)
        self._frames, self._next = self._container.decode(video=0), 0


class _ImageFolderFrames:
    def __init__(self, path: Path):
        self.files = _image_files(path)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Image.Image:
        return _read_image(self.files[index]).convert("RGB")


class VideoData:
    """``VideoData(video_file=... | image_folder=..., height=, width=)``: ``len()`` and ``video[i]`` (a PIL image,
    centre-cropped and resized to height x width when both are given); frames are read when indexed."""

    def __init__(self, video_file: str | os.PathLike | None = None, image_folder: str | os.PathLike | None = None,
                 height: int | None = None, width: int | None = None, **_ignored):
        if (video_file is None) == (image_folder is None):
            raise ConfigError("VideoData needs exactly one of video_file= and image_folder=")
        if (height is None) != (width is None):
            raise ConfigError("VideoData takes both height and width, or neither (frames keep their size)")
        source = _existing(video_file if video_file is not None else image_folder)
        self.data = _ImageFolderFrames(source) if source.is_dir() else _VideoFileFrames(source)
        self.height, self.width = height, width
        self.length = None

    def set_length(self, length: int) -> None:
        self.length = length

    def set_shape(self, height: int | None, width: int | None) -> None:
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.data) if self.length is None else min(self.length, len(self.data))

    def __getitem__(self, index: int) -> Image.Image:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} is outside the video's {len(self)} frames")
        frame = self.data[index]
        if self.height is not None and frame.size != (self.width, self.height):
            frame = crop_and_resize(frame, self.height, self.width)
        return frame

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def shape(self) -> tuple[int, int]:
        return (self.height, self.width) if self.height is not None else self[0].size[::-1]

    def raw_data(self) -> list[Image.Image]:
        return list(self)

    def save_images(self, folder: str | os.PathLike) -> None:
        save_frames(list(self), folder)


def save_frames(frames, save_path: str | os.PathLike) -> None:
    """Each frame as ``{index}.png`` in the folder ``save_path`` (DiffSynth's naming), each written to a temporary
    file and renamed."""
    from .video_io import _atomic_file, _frame_arrays

    folder = Path(save_path)
    _, _, arrays = _frame_arrays(frames)
    folder.mkdir(parents=True, exist_ok=True)
    for index, array in enumerate(arrays):
        _atomic_file(folder / f"{index}.png", lambda tmp, a=array: Image.fromarray(a).save(tmp, format="PNG"))
