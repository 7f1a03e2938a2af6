"""Frames given to a pipeline (images, arrays, tensors, VideoData, a video file) as the VAE's input tensor."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError

logger = logging.getLogger(__name__)


def frames_tensor(frames, height: int, width: int, name: str = "input_frames") -> torch.Tensor:
    """``frames`` as a (f, 3, height, width) float32 tensor in [-1, 1]. Accepts what ``save_video`` accepts (PIL
    images, (f, h, w, 3) arrays or tensors, uint8 or float in [0, 1]), a ``VideoData``, or a video file / folder
    path. Frames of another size are resized (Lanczos) to height x width, with a note in the log."""
    from ..video_io import _frame_arrays, load_video

    if isinstance(frames, (str, os.PathLike)):
        frames = load_video(frames)
    elif isinstance(frames, Image.Image):
        raise ConfigError(f"{name} takes a sequence of frames; for one image pass [image] * num_frames")
    elif not isinstance(frames, (np.ndarray, torch.Tensor, list, tuple)):
        frames = list(frames)  # VideoData and other sequences of images
    try:
        h, w, arrays = _frame_arrays(frames)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None
    arrays = list(arrays)
    if (h, w) != (height, width):
        logger.warning("%s are %dx%d; resized to %dx%d (width x height) to match the requested size", name, w, h,
                       width, height)
        arrays = [np.asarray(Image.fromarray(a).resize((width, height), Image.LANCZOS)) for a in arrays]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0
