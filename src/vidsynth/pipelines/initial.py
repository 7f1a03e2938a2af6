"""The initial state of sampling: the noise, and for video-to-video the clean latents of the given frames."""
from __future__ import annotations

import torch

from .free_noise import initial_noise
from .request import VideoRequest

ENCODE_CHUNK = 16  # frames per encoder call at most (diffusers' default chunk), fewer for large frames


def frames_per_call(latent_pixels: int, cap: int) -> int:
    """Frames per VAE call: about 8 frames of 512x512 (64x64 latents) worth of activations, at most ``cap``."""
    return max(1, min(cap, 64 * 64 * 8 // latent_pixels))


@torch.inference_mode()
def encode_frames(vae, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(f, 3, H, W) frames in [-1, 1] -> scaled latents (f, 4, H/8, W/8) in float32, each a sample of the VAE's
    posterior (as diffusers' video-to-video pipeline takes it), chunk by chunk in frame order."""
    chunk = frames_per_call(pixels.shape[-2] * pixels.shape[-1] // 64, ENCODE_CHUNK)
    latents = [vae.encode(part, sample=True, generator=generator).float() for part in pixels.split(chunk)]
    return torch.cat(latents) * vae.scaling_factor


def initial_state(pipe, request: VideoRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(noise, clean latents or None), both (1, 4, f, h, w) float32 on the pipeline's device.

    Noise is drawn on the generator's device (the CPU by default), so one seed gives one video everywhere; given
    ``latents`` are the noise. With frames to start from, the frames are encoded first and the noise drawn after, in
    diffusers' (1, f, 4, h, w) order, so seeded runs draw what diffusers' video-to-video pipeline draws."""
    r, generator = request, request.generator
    device = generator.device if generator is not None else torch.device("cpu")
    init = None
    if r.start_step > 0:
        init = encode_frames(pipe.vae, r.input_frames, generator)  # the VAE moves them to its device
        init = init.transpose(0, 1).unsqueeze(0).to(pipe.device)
    if r.free_noise is not None and init is None:  # FreeNoise's rescheduled noise (full-length latents: as they are)
        noise = initial_noise(r.free_noise, r.latent_shape, generator=generator, latents=r.latents, device=device)
    elif r.latents is not None:
        noise = r.latents
    elif init is not None:
        b, c, f, h, w = r.latent_shape
        noise = torch.randn((b, f, c, h, w), generator=generator, dtype=torch.float32, device=device).transpose(1, 2)
    else:
        noise = torch.randn(r.latent_shape, generator=generator, dtype=torch.float32, device=device)
    return noise.to(pipe.device, torch.float32), init
