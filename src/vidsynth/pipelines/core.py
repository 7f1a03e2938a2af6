"""The text-to-video core shared by SD 1.5 and SDXL: checks, noise, CFG over context windows, sampling, decoding.

Latents are ``(b, 4, f, h, w)`` at the API (the diffusers convention) and ``(f, 4, h, w)`` inside, frames folded
into the batch for every layer except the motion modules.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .. import sampling
from ..errors import ConfigError
from .context import context_windows, window_weights


@dataclass
class Conditioning:
    context: torch.Tensor            # (n, tokens, dim)
    y: torch.Tensor | None = None    # (n, adm) for SDXL


FALLBACK_SAMPLING = {"sampler": "ddim", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                     "timestep_spacing": "leading", "steps_offset": 1, "steps": 25, "cfg_scale": 7.5}


class VideoPipeline:
    """Holds the modules of one family; subclasses say how text becomes conditioning."""

    family: str = ""
    conditioning_options: tuple[str, ...] = ()

    def __init__(self, unet, vae, text_encoders, tokenizers, motion_modules=None, *, device=None, dtype=None):
        self.unet, self.vae, self.motion_modules = unet, vae, motion_modules
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        param = next(unet.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype

    @classmethod
    def from_model_manager(cls, model_manager, **kwargs):
        mm = model_manager
        missing = [n for n in cls.required_models() if mm.fetch_model(n) is None]
        if missing:
            raise ConfigError(f"{cls.__name__} needs {', '.join(missing)}, which the ModelManager does not hold; load "
                              f"a {cls.family} single-file checkpoint (it holds UNet, VAE and text encoders)")
        if mm.family and mm.family != cls.family:
            raise ConfigError(f"the ModelManager holds a {mm.family} model; use "
                              f"{'SDXLVideoPipeline' if mm.family == 'sdxl' else 'SDVideoPipeline'} for it")
        encoders = [mm.fetch_model(n) for n in ("text_encoder", "text_encoder_2") if mm.fetch_model(n) is not None]
        return cls(mm.unet, mm.vae, encoders, cls.make_tokenizers(), mm.motion_modules,
                   device=mm.device, dtype=mm.torch_dtype, **kwargs)

    @classmethod
    def required_models(cls) -> tuple[str, ...]:
        return ("unet", "vae", "text_encoder")

    @staticmethod
    def make_tokenizers() -> list:
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str], *, clip_skip: int, height: int, width: int, **extra) -> Conditioning:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------- call
    @torch.inference_mode()
    def __call__(self, prompt: str, negative_prompt: str = "", cfg_scale: float | None = None, height: int = 512,
                 width: int = 512, num_frames: int = 16, num_inference_steps: int | None = None, *,
                 seed: int | None = None, generator: torch.Generator | None = None, sampler: str | None = None,
                 clip_skip: int = 1, latents: torch.Tensor | None = None, output_type: str = "pil",
                 context_length: int | None = None, context_overlap: int = 4, closed_loop: bool = False,
                 motion_scale: float = 1.0, progress_bar: bool = True, allow_static: bool = False,
                 vae_batch_size: int | None = None, tiled: bool | None = None,
                 animatediff_batch_size: int | None = None, animatediff_stride: int | None = None, **options):
        if animatediff_batch_size is not None:  # DiffSynth's names: window length and window stride
            context_length = animatediff_batch_size
        if animatediff_stride is not None:
            context_overlap = (context_length or 16) - animatediff_stride
        defaults = self.default_sampling()
        cfg_scale = defaults["cfg_scale"] if cfg_scale is None else cfg_scale
        steps = defaults["steps"] if num_inference_steps is None else num_inference_steps
        extra = {k: options.pop(k) for k in self.conditioning_options if k in options}
        config = self.sampler_config(defaults, sampler, options)
        if options:
            raise ConfigError(f"unexpected argument(s) {', '.join(sorted(options))}; sampler settings are "
                              f"{', '.join(sampling.SamplerConfig.__dataclass_fields__)}")
        window = self.check(height=height, width=width, num_frames=num_frames, cfg_scale=cfg_scale, steps=steps,
                            config=config, clip_skip=clip_skip, latents=latents, output_type=output_type,
                            context_length=context_length, context_overlap=context_overlap, allow_static=allow_static)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)

        use_cfg = cfg_scale != 1.0
        prompts = [negative_prompt, prompt] if use_cfg else [prompt]
        cond = self.encode_prompts(prompts, clip_skip=clip_skip, height=height, width=width, **extra)
        shape = (1, 4, num_frames, height // 8, width // 8)
        if latents is None:  # drawn on the generator's device (the CPU by default): one seed, one video everywhere
            latents = torch.randn(shape, generator=generator, dtype=torch.float32,
                                  device=generator.device if generator is not None else "cpu")
        # the sampler sees (1, 4, f, h, w) like diffusers, so its extra noise draws (eta, ancestral, LCM) match
        x = latents.to(self.device, torch.float32)

        eps = self.make_denoiser(cond, cfg_scale, num_frames, window, context_overlap, closed_loop, motion_scale)
        bar = tqdm(total=steps, desc="denoising", disable=not progress_bar)
        try:
            x0 = sampling.sample(config, eps, x, steps, generator=generator, callback=lambda i, n: bar.update(1))
        finally:
            bar.close()
        if output_type == "latent":
            return x0
        return self.decode(x0[0].transpose(0, 1), output_type=output_type, batch_size=vae_batch_size, tiled=tiled,
                           progress_bar=progress_bar)

    # ------------------------------------------------------------------------------------------- sampling
    def default_sampling(self) -> dict:
        if self.motion_modules is None:
            return dict(FALLBACK_SAMPLING)
        return {**FALLBACK_SAMPLING, **self.motion_modules.config.sampling_defaults()}

    @staticmethod
    def sampler_config(defaults: dict, sampler: str | None, options: dict) -> sampling.SamplerConfig:
        fields = set(sampling.SamplerConfig.__dataclass_fields__)
        config = sampling.SamplerConfig(**{k: v for k, v in defaults.items() if k in fields})
        chosen = {k: options.pop(k) for k in list(options) if k in fields}
        if sampler is not None:
            chosen["sampler"] = sampler
        return replace(config, **chosen)

    def make_denoiser(self, cond: Conditioning, cfg_scale: float, num_frames: int, window: int, overlap: int,
                      closed_loop: bool, motion_scale: float):
        """eps(x_t, t) over the whole video: every context window runs once, conditional and unconditional in one
        batch; overlapping windows cross-fade by their blending weights."""
        windows = context_windows(num_frames, window, overlap, closed_loop)
        # all windows have one length; a lone window weighs every frame 1
        weights = window_weights(len(windows[0]), overlap if len(windows) > 1 else 0).to(self.device)
        n_cond = cond.context.shape[0]
        motion = self.motion_modules
        if motion is not None:
            motion.scale = motion_scale
        pool_norms = motion is not None and motion.config.pool_resnet_norms

        # conditioning repeated once per frame, built once for every window length in use
        per_frame = {n: (cond.context.repeat_interleave(n, dim=0),
                         None if cond.y is None else cond.y.repeat_interleave(n, dim=0))
                     for n in {len(frames) for frames in windows}}

        def eps(video: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = video[0].transpose(0, 1)  # (f, 4, h, w): frames folded into the batch
            total = torch.zeros_like(x)
            weight_sum = torch.zeros(num_frames, device=x.device, dtype=x.dtype)
            for frames in windows:
                length = len(frames)
                xw = x[frames].to(self.dtype)
                batch = xw.repeat(n_cond, 1, 1, 1)  # (n_cond * length, c, h, w): clip 0 = uncond, clip 1 = cond
                context, y = per_frame[length]
                timesteps = t.to(self.device, torch.float32).reshape(-1)[:1].expand(batch.shape[0])
                out = self.unet(batch, timesteps, context, y, num_frames=length, motion=motion,
                                pool_resnet_norms=pool_norms).float()
                if n_cond == 2:
                    uncond, text = out.chunk(2)
                    out = uncond + cfg_scale * (text - uncond)
                total[frames] += out * weights[:, None, None, None]
                weight_sum[frames] += weights
            return (total / weight_sum[:, None, None, None]).transpose(0, 1).unsqueeze(0)

        return eps

    # ------------------------------------------------------------------------------------------- decoding
    def decode(self, x0: torch.Tensor, *, output_type: str, batch_size: int | None, tiled: bool | None,
               progress_bar: bool):
        from ..video_io import frames_to_pil

        latents = x0 / self.vae.scaling_factor  # the VAE casts to its decoder's dtype
        pixels = latents.shape[-2] * latents.shape[-1]
        # whole frames up to SDXL's native 1024 px, as the original pipelines decode; tiles only beyond that
        tiled = pixels > 128 * 128 if tiled is None else tiled
        batch_size = batch_size or max(1, 64 * 64 * 8 // pixels)  # ~8 frames of 512 px per decoder call
        frames = []
        for start in tqdm(range(0, latents.shape[0], batch_size), desc="decoding", disable=not progress_bar):
            frames.append(self.vae.decode(latents[start:start + batch_size], tile=tiled).float().cpu())
        images = torch.cat(frames)  # (f, 3, H, W) in [-1, 1]
        if output_type == "np":
            return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        if output_type == "pt":
            return (images.clamp(-1, 1) + 1) / 2
        return frames_to_pil(images)

    # --------------------------------------------------------------------------------------------- checks
    def check(self, *, height, width, num_frames, cfg_scale, steps, config, clip_skip, latents, output_type,
              context_length, context_overlap, allow_static) -> int:
        """Refuse arguments that cannot work, before any compute. Returns the context-window length."""
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise ConfigError(f"height and width must be positive multiples of 8, got {height}x{width}; "
                              f"try {max(8, height // 8 * 8)}x{max(8, width // 8 * 8)}")
        if num_frames < 1:
            raise ConfigError(f"num_frames must be at least 1, got {num_frames}")
        if cfg_scale < 0:
            raise ConfigError(f"cfg_scale must be >= 0 (1 disables classifier-free guidance), got {cfg_scale}")
        if clip_skip < 1:
            raise ConfigError(f"clip_skip counts layers from the end and starts at 1 (the last layer), got {clip_skip}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ConfigError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        sampling.validate(config, steps)
        motion = self.motion_modules
        if motion is None:
            if not allow_static:
                raise ConfigError("no motion module is loaded, so frames would not move together; load an AnimateDiff "
                                  "motion module into the ModelManager, or pass allow_static=True for independent frames")
            native = 16
        else:
            self.check_motion_fits(motion)
            native = motion.config.pe_length
        length = context_length if context_length is not None else min(16, native)
        if length < 1 or length > native:
            raise ConfigError(f"context_length must be between 1 and the motion module's native length {native}, "
                              f"got {length}")
        if num_frames > length and not 0 <= context_overlap < length:
            raise ConfigError(f"context_overlap must be in [0, context_length={length}), got {context_overlap}")
        if latents is not None:
            expected = (1, 4, num_frames, height // 8, width // 8)
            if tuple(latents.shape) != expected:
                raise ConfigError(f"latents must have shape (1, 4, num_frames, height/8, width/8) = {expected}, "
                                  f"got {tuple(latents.shape)}")
        return length

    def check_motion_fits(self, motion) -> None:
        unet_sites = self.unet.motion_sites()
        wrong = {name: (ch, unet_sites.get(name)) for name, ch in motion.sites().items() if unet_sites.get(name) != ch}
        if wrong:
            name, (ch, found) = next(iter(wrong.items()))
            raise ConfigError(f"the motion module ({motion.config.version}, for {motion.config.base_family}) does not "
                              f"fit this {self.family} UNet: {len(wrong)} of its sites differ, e.g. {name} has {ch} "
                              f"channels where the UNet has {found}; load a motion module made for {self.family}")
