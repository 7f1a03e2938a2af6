"""The long-video options of one call (FreeNoise, FreeInit, prompt travel, motion-scale schedules) parsed into
request fields and checked before any compute; each option's own file does the work in its stage."""
from __future__ import annotations

from typing import Mapping

from ..errors import ConfigError
from .free_init import FreeInit
from .free_noise import FreeNoise
from .motion_schedule import motion_scale_schedule
from .prompt_travel import keyframes


def long_video_fields(*, free_noise, free_init, motion_scale, num_frames, native_length: int) -> dict:
    """``free_noise`` / ``free_init`` / ``motion_scale`` of a call as VideoRequest fields."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        return dict(free_noise=FreeNoise.parse(free_noise, native_length), free_init=FreeInit.parse(free_init),
                    motion_scale=motion_scale)  # the frame count is reported by the request check
    return dict(free_noise=FreeNoise.parse(free_noise, native_length), free_init=FreeInit.parse(free_init),
                motion_scale=motion_scale_schedule(motion_scale, num_frames))


def check_long_video(r) -> None:
    for what, value in (("prompt", r.prompt), ("negative_prompt", r.negative_prompt)):
        if not isinstance(value, (str, Mapping)):
            raise ConfigError(f"{what} must be a string or a {{frame: text}} dict (a list of prompts renders one "
                              f"video each), got {type(value).__name__}")
        keyframes(value, r.num_frames, what)
    if r.free_noise is not None and r.closed_loop:
        raise ConfigError("free_noise and closed_loop=True do not combine (FreeNoise's windows do not wrap around); "
                          "drop one of them")
    if r.free_init is not None and r.start_step > 0:
        raise ConfigError("free_init re-noises from the last train timestep, so it cannot start from input_frames "
                          "with denoising_strength < 1; drop free_init or use strength 1")
