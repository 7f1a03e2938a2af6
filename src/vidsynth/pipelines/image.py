"""Text-to-image (and image-to-image) on the video core: one frame, no motion module (DiffSynth's SDImagePipeline /
SDXLImagePipeline names and call)."""
from __future__ import annotations

from ..errors import ConfigError
from .sd_video import SDVideoPipeline
from .sdxl_video import SDXLVideoPipeline


class ImagePipeline:
    """Mixin over a video pipeline: the image model alone (a loaded motion module is not used), one frame a call.
    ``input_image`` + ``denoising_strength`` is image-to-image. Returns one image (or array / tensor / latents of
    one frame as ``output_type`` says); a list of prompts returns a list."""

    def __init__(self, unet, vae, text_encoders, tokenizers, motion_modules=None, **kwargs):
        super().__init__(unet, vae, text_encoders, tokenizers, None, **kwargs)

    def __call__(self, prompt, negative_prompt="", cfg_scale: float | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = None, *, input_image=None,
                 local_prompts=(), masks=(), mask_scales=(), **options):
        if local_prompts or masks or mask_scales:
            raise ConfigError("local_prompts / masks (DiffSynth's regional prompting) are not supported; render "
                              "with one prompt")
        if options.pop("num_frames", 1) != 1:
            raise ConfigError(f"{type(self).__name__} renders one image; use the video pipeline for several frames")
        if input_image is not None:
            options["input_frames"] = [input_image]
        result = super().__call__(prompt, negative_prompt, cfg_scale, height, width, 1, num_inference_steps,
                                  allow_static=True, **options)
        output_type = options.get("output_type", "pil")
        if isinstance(prompt, (list, tuple)) or options.get("num_videos_per_prompt", 1) > 1:
            return [first_frame(video, output_type) for video in result]
        return first_frame(result, output_type)


def first_frame(video, output_type: str):
    if output_type == "latent":  # (1, 4, 1, h, w) -> (1, 4, h, w)
        return video[:, :, 0]
    return video[0]


class SDImagePipeline(ImagePipeline, SDVideoPipeline):
    """SD 1.5 text-to-image."""


class SDXLImagePipeline(ImagePipeline, SDXLVideoPipeline):
    """SDXL text-to-image."""

