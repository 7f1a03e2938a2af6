"""ControlNet preprocessors by DiffSynth's ``processor_id``: a PIL frame in, the control image (same size) out.

``none``, ``tile`` and ``inpaint`` pass the frame through; ``canny`` is OpenCV's Canny (thresholds 100 / 200, as
controlnet_aux's ``CannyDetector``; install the ``control`` extra); ``lineart`` runs the original annotator network
``models/Annotators/sk_model.pth`` and returns white lines on black, as controlnet_aux's ``LineartDetector``. Frames
are detected at ``detect_resolution`` (default: the shorter side, as DiffSynth), with both sides rounded to
multiples of 64 (the annotators' ``resize_image``), and the result resized back to the frame's size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vidsynth.errors import ConfigError

PASS_THROUGH = ("none", "tile", "inpaint")
# DiffSynth's other processor ids and the annotator files controlnet_aux would read for them
NEEDS_ANNOTATOR = {"depth": "dpt_hybrid-midas-501f0c75.pt", "softedge": "ControlNetHED.pth",
                   "lineart_anime": "netG.pth", "openpose": "body_pose_model.pth, hand_pose_model.pth, facenet.pth",
                   "normal": "scannet.pt"}
PROCESSOR_IDS = (*PASS_THROUGH, "canny", "lineart")


def detect_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The annotators' ``resize_image``: shorter side to ``resolution``, both sides rounded to multiples of 64."""
    k = resolution / min(width, height)
    return max(64, int(round(width * k / 64)) * 64), max(64, int(round(height * k / 64)) * 64)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConfigError('processor_id="canny" needs OpenCV: pip install "vidsynth[control]" '
                          "(opencv-python-headless), or pass edge maps with processor_id=\"none\"") from None
    return cv2


class Processor:
    """``Processor("lineart", model_path="models/Annotators")(frame) -> control frame`` (PIL, RGB)."""

    def __init__(self, processor_id: str, model_path: str | Path = "models/Annotators", *,
                 detect_resolution: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.processor_id = processor_id
        self.detect_resolution = detect_resolution
        self.model = None
        if processor_id in NEEDS_ANNOTATOR:
            raise ConfigError(
                f'processor_id="{processor_id}" needs the annotator {NEEDS_ANNOTATOR[processor_id]} '
                f"(in {model_path}) and its network, which vidsynth does not include; preprocess the frames "
                f'yourself and pass them as controlnet_frames with processor_id="none"')
        if processor_id == "canny":
            _cv2()
        elif processor_id == "lineart":
            self.model = load_lineart(Path(model_path), device=device, dtype=dtype)
        elif processor_id not in PASS_THROUGH:
            raise ConfigError(f"unknown processor_id {processor_id!r}; use one of {', '.join(PROCESSOR_IDS)} "
                              f'(or preprocess the frames yourself and use "none")')

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        if self.processor_id in PASS_THROUGH:
            return image
        size = detect_size(*image.size, self.detect_resolution or min(image.size))
        if self.processor_id == "canny":
            cv2 = _cv2()
            area = size[0] * size[1] < image.size[0] * image.size[1]
            frame = cv2.resize(np.asarray(image), size, interpolation=cv2.INTER_AREA if area else cv2.INTER_LANCZOS4)
            edges = cv2.Canny(frame, 100, 200)
            return Image.fromarray(edges).convert("RGB").resize(image.size, Image.BILINEAR)
        return self._lineart(image, size)

    @torch.inference_mode()
    def _lineart(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        weight = self.model.model0[1].weight
        frame = image.resize(size, Image.BOX if size[0] < image.size[0] else Image.LANCZOS)
        x = torch.from_numpy(np.asarray(frame).copy()).to(weight.device, torch.float32).permute(2, 0, 1) / 255
        line = self.model(x[None].to(weight.dtype))[0, 0].float().clamp(0, 1)
        drawn = 255 - (line * 255).to(torch.uint8).cpu().numpy()  # white lines on black, as the ControlNet expects
        return Image.fromarray(drawn).convert("RGB").resize(image.size, Image.BILINEAR)


def load_lineart(model_path: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The annotator network from ``model_path`` (``sk_model.pth`` or the folder holding it), loaded strictly."""
    from vidsynth.checkpoints import Checkpoint
    from vidsynth.models.lineart import LineartConfig, LineartGenerator

    file = model_path / "sk_model.pth" if model_path.is_dir() or not model_path.suffix else model_path
    if not file.is_file():
        raise ConfigError(f'processor_id="lineart" needs the annotator file {file} (sk_model.pth from '
                          'the lllyasviel/Annotators repository), or pass line drawings with processor_id="none"')
    ckpt = Checkpoint(file)
    with torch.device("meta"):
        model = LineartGenerator(LineartConfig.from_state_dict(ckpt.shapes))
    model.load_state_dict(ckpt.state_dict(dtype=dtype, device=torch.device(device)), strict=True, assign=True)
    return model.eval().requires_grad_(False)
