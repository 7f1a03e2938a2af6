"""The text-to-video core shared by SD 1.5 and SDXL: checks, noise, CFG over context windows, sampling, decoding.

Latents are ``(b, 4, f, h, w)`` at the API (the diffusers convention) and ``(f, 4, h, w)`` inside, frames folded
into the batch for every layer except the motion modules.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from .. import sampling
from ..errors import ConfigError
from ..runtime import reusing_freed_memory
from . import ip_adapter as ip_stage
from . import sparsectrl as sparsectrl_stage
from .conditioning import Conditioning
from .controlnet import control_request, load_units
from .controlnet import providers as control_providers
from .denoiser import WindowedDenoiser
from .diffusers_aliases import DiffusersLongVideoAliases
from .free_init import free_init_sample
from .frames import frames_tensor
from .initial import initial_state
from .long_video import long_video_fields
from .prompt_travel import is_travel, per_frame_conditioning
from .request import FALLBACK_SAMPLING, VideoRequest, check, sampler_config

logger = logging.getLogger(__name__)

# DiffSynth-Studio 1.x call arguments that only tune its memory use or progress display: accepted, no effect here
DIFFSYNTH_NO_EFFECT = ("unet_batch_size", "controlnet_batch_size", "vram_limit_level", "tile_size", "tile_stride",
                       "progress_bar_cmd", "progress_bar_st", "smoother_progress_ids")


class VideoPipeline(DiffusersLongVideoAliases):
    """Holds the modules of one family; subclasses say how text becomes conditioning."""

    family: str = ""
    conditioning_options: tuple[str, ...] = ()
    ip_adapter = image_encoder = sparsectrl = None  # image conditions, taken from the ModelManager when it holds them

    def __init__(self, unet, vae, text_encoders, tokenizers, motion_modules=None, *, device=None, dtype=None,
                 controlnets=()):
        self.unet, self.vae, self.motion_modules = unet, vae, motion_modules
        self.controlnets = list(controlnets)  # pipelines.controlnet.ControlNetUnit
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        param = next(unet.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        self.vae_slicing = self.vae_tiling = False  # enable_vae_slicing() / enable_vae_tiling()

    @classmethod
    def from_model_manager(cls, model_manager, controlnet_config_units=(), **kwargs):
        mm = model_manager
        missing = [n for n in cls.required_models() if mm.fetch_model(n) is None]
        if missing:
            raise ConfigError(f"{cls.__name__} needs {', '.join(missing)}, which the ModelManager does not hold; load "
                              f"a {cls.family} single-file checkpoint (it holds UNet, VAE and text encoders)")
        if mm.family and mm.family != cls.family:
            raise ConfigError(f"the ModelManager holds a {mm.family} model; use "
                              f"{'SDXLVideoPipeline' if mm.family == 'sdxl' else 'SDVideoPipeline'} for it")
        encoders = [mm.fetch_model(n) for n in ("text_encoder", "text_encoder_2") if mm.fetch_model(n) is not None]
        controlnets = load_units(mm, controlnet_config_units, cls.family) if controlnet_config_units else ()
        pipe = cls(mm.unet, mm.vae, encoders, cls.make_tokenizers(), mm.motion_modules,
                   device=mm.device, dtype=mm.torch_dtype, controlnets=controlnets, **kwargs)
        for path in getattr(mm, "textual_inversions", ()):
            pipe.load_textual_inversion(path)
        pipe.ip_adapter, pipe.image_encoder, pipe.sparsectrl = (mm.fetch_model(n) for n in
                                                                ("ip_adapter", "image_encoder", "sparsectrl"))
        return pipe

    def load_textual_inversion(self, path, token: str | None = None) -> str:
        """Make ``token`` (default: the file's name without extension) stand for the embedding in ``path`` in this
        pipeline's prompts; returns the word. diffusers' name; DiffSynth's is ``pipe.prompter.load_textual_inversions``."""
        from ..textual_inversion import attach_embedding
        return attach_embedding(self.tokenizers, self.text_encoders, path, token)

    @property
    def prompter(self):
        from ..textual_inversion import Prompter
        return Prompter(self)

    # ------------------------------------------------------------------------- memory switches (diffusers' names)
    def enable_model_cpu_offload(self, device: str | torch.device = "cuda"):
        """Models wait in CPU memory and move to ``device`` when called (one at a time); see pipelines/offload.py."""
        from .offload import enable_model_cpu_offload
        self.offload = enable_model_cpu_offload(self, device)
        return self.offload

    def compile(self, *, vae: bool = False, **options) -> "VideoPipeline":
        """Compile the UNet's blocks with the motion modules inside with ``torch.compile`` (inductor). On a 2-core
        AMX CPU a warm bfloat16 SD 1.5 + v2 denoise gets ~7% faster than the eager one (whose fused oneDNN epilogues
        inductor makes itself) after a first call that compiles for over a minute (`benchmarks/generate.py --compile
        ours` against `--warm`), so it is off by default. A new frame count, size or CFG setting compiles again, as
        does a run-time LoRA put on or off or given another alpha; weights changed in place (merged LoRAs) are used
        as they are. ``vae=True`` compiles the VAE decoder too, which on CPU was no faster than eager. ``options``
        go to ``torch.compile`` (``dynamic=False`` unless given); returns the pipeline."""
        options = {"dynamic": False, **options}
        self.unet.compile_blocks(**options)
        if vae:
            self.vae.decoder.compile(**options)
        return self

    def enable_vae_slicing(self) -> None:
        """Decode one frame per VAE call (when ``vae_batch_size`` is not given)."""
        self.vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self.vae_slicing = False

    def enable_vae_tiling(self) -> None:
        """Decode in overlapping tiles whatever the size (when ``tiled`` is not given)."""
        self.vae_tiling = True

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = False

    @classmethod
    def required_models(cls) -> tuple[str, ...]:
        return ("unet", "vae", "text_encoder")

    @staticmethod
    def make_tokenizers() -> list:
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str], *, clip_skip: int, height: int, width: int, **extra) -> Conditioning:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------- call
    default_size: int = 512

    @torch.inference_mode()
    def __call__(self, prompt, negative_prompt="", cfg_scale: float | None = None, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, num_inference_steps: int | None = None, *,
                 clip_skip: int = 1, input_frames=None, denoising_strength: float = 1.0, seed: int | None = None,
                 generator: torch.Generator | None = None, sampler: str | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", context_length: int | None = None,
                 context_overlap: int = 4, closed_loop: bool = False, motion_scale=1.0, free_noise=None,
                 free_init=None, prompt_interpolation=None,
                 num_videos_per_prompt: int = 1, callback_on_step_end=None, progress_bar: bool = True,
                 allow_static: bool = False, vae_batch_size: int | None = None, tiled: bool | None = None,
                 animatediff_batch_size: int | None = None, animatediff_stride: int | None = None, **options):
        """Render a video (a list of frames, or as ``output_type`` says). A list of prompts renders one video per
        prompt (and ``num_videos_per_prompt`` each), the i-th with ``seed + i`` when a seed is given; then a list of
        videos is returned. Names of DiffSynth-Studio 1.x and diffusers are accepted (``strength`` / ``video``,
        ``animatediff_batch_size`` / ``animatediff_stride``); sampler settings (``eta``, ``karras``, ...) too."""
        if "strength" in options:  # diffusers' names
            denoising_strength = options.pop("strength")
        if "video" in options:
            input_frames = options.pop("video")
        if "guidance_scale" in options:
            cfg_scale = options.pop("guidance_scale")
        if options.pop("smoother", None) is not None or options.pop("cross_frame_attention", False):
            raise ConfigError("DiffSynth's smoother and cross_frame_attention are not supported; drop them")
        for name in DIFFSYNTH_NO_EFFECT:
            options.pop(name, None)
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ConfigError(f"num_videos_per_prompt must be a positive integer, got {num_videos_per_prompt!r}")
        prompts = prompt if isinstance(prompt, (list, tuple)) else [prompt]
        negatives = negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
        if not prompts or len(negatives) != len(prompts):
            raise ConfigError(f"negative_prompt must be one string or one per prompt: got {len(negatives)} for "
                              f"{len(prompts)} prompt(s)")
        jobs = [(p, n) for p, n in zip(prompts, negatives) for _ in range(num_videos_per_prompt)]
        if latents is not None and len(jobs) > 1:
            raise ConfigError("latents= fixes the noise of one video; with several prompts / videos per prompt pass "
                              "a seed instead")
        common = dict(cfg_scale=cfg_scale, height=height, width=width, num_frames=num_frames,
                      num_inference_steps=num_inference_steps, clip_skip=clip_skip, input_frames=input_frames,
                      denoising_strength=denoising_strength, generator=generator, sampler=sampler, latents=latents,
                      output_type=output_type, context_length=context_length, context_overlap=context_overlap,
                      closed_loop=closed_loop, motion_scale=motion_scale, free_noise=free_noise, free_init=free_init,
                      prompt_interpolation=prompt_interpolation, callback_on_step_end=callback_on_step_end,
                      progress_bar=progress_bar, vae_batch_size=vae_batch_size, tiled=tiled,
                      animatediff_batch_size=animatediff_batch_size, animatediff_stride=animatediff_stride)
        requests = [self.make_request(p, n, seed=None if seed is None else seed + i, options=dict(options), **common)
                    for i, (p, n) in enumerate(jobs)]
        for r in requests:  # every request checked before the first one renders
            check(r, self.motion_modules, allow_static)
            if self.motion_modules is not None:
                self.check_motion_fits(self.motion_modules)
        videos = [self.run(r) for r in requests]
        return videos if isinstance(prompt, (list, tuple)) or num_videos_per_prompt > 1 else videos[0]

    def make_request(self, prompt, negative_prompt, *, cfg_scale, height, width, num_frames, num_inference_steps,
                     seed, generator, sampler, input_frames, context_length, context_overlap, animatediff_batch_size,
                     animatediff_stride, options, motion_scale, free_noise, free_init, prompt_interpolation,
                     **fields) -> VideoRequest:
        """The call's arguments, defaults filled in, as one request (checked separately by ``request.check``)."""
        if animatediff_batch_size is not None:  # DiffSynth's names: window length and window stride
            context_length = animatediff_batch_size
        if animatediff_stride is not None:
            context_overlap = (context_length or 16) - animatediff_stride
        defaults = self.default_sampling()
        conditioning_options = {k: options.pop(k) for k in self.conditioning_options if k in options}
        # ControlNet first: with ControlNets loaded controlnet_conditioning_scale is theirs, else SparseCtrl's alias
        control = control_request(self.controlnets, options, height=self.default_size if height is None else height,
                                  width=self.default_size if width is None else width, num_frames=num_frames)
        image_prompt = ip_stage.parse_image_prompt(options)
        keyframes = sparsectrl_stage.pop_keyframes(options, self.sparsectrl is not None)
        config = sampler_config(defaults, sampler, options)
        if options:
            raise ConfigError(f"unexpected argument(s) {', '.join(sorted(options))}; sampler settings are "
                              f"{', '.join(sampling.SamplerConfig.__dataclass_fields__)}")
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        frames = None
        if input_frames is not None:
            if isinstance(height, int) and isinstance(width, int) and height % 8 == 0 and width % 8 == 0:
                frames = frames_tensor(input_frames, height, width)
            else:
                frames = torch.empty(0)  # the size check reports the problem
        if num_frames is None:
            given = frames if frames is not None else control and control.frames[0]  # start or control frames
            num_frames = len(given) if given is not None and len(given) else 16
        native = self.motion_modules.config.pe_length if self.motion_modules is not None else 16
        long_video = long_video_fields(
            free_noise=self._free_noise_default if free_noise is None else free_noise,
            free_init=self._free_init_default if free_init is None else free_init,
            motion_scale=motion_scale, num_frames=num_frames, native_length=native)
        if context_length is None:
            # FreeNoise windows inside the motion modules, so the UNet sees the whole video (as diffusers)
            context_length = num_frames if long_video["free_noise"] is not None else min(16, native)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        ip_stage.check_call(self, image_prompt)
        keyframes = sparsectrl_stage.parse_keyframes(keyframes, num_frames, self.sparsectrl)
        return VideoRequest(
            prompt=prompt, negative_prompt=negative_prompt,
            cfg_scale=defaults["cfg_scale"] if cfg_scale is None else cfg_scale, height=height, width=width,
            num_frames=num_frames, steps=defaults["steps"] if num_inference_steps is None else num_inference_steps,
            sampler=config, generator=generator, input_frames=frames, context_length=context_length,
            context_overlap=context_overlap, conditioning_options=conditioning_options, image_prompt=image_prompt,
            keyframes=keyframes, control=control,
            prompt_interpolation=prompt_interpolation or self._prompt_interpolation_default, **long_video, **fields)

    def run(self, request: VideoRequest):
        """The five stages of one checked request: conditioning, initial state, denoiser, sampler loop, decode."""
        r = request
        cond = self.condition(r)
        noise, init = initial_state(self, r)
        with ip_stage.applied(self, r.image_prompt):  # the adapter's hooks on the UNet for this call only
            eps = self.make_denoiser(r, cond)
            # the steps reuse each other's freed activations; the heap is trimmed before decoding, whose batch size
            # is budgeted on memory that is given back (kept, the decoder's peak grew ~0.3 GiB by fragmentation)
            with reusing_freed_memory(self.device):
                x0 = self.sample(r, eps, noise, init)
        if r.output_type == "latent":
            return x0
        return self.decode(x0[0].transpose(0, 1), output_type=r.output_type, batch_size=r.vae_batch_size,
                           tiled=r.tiled, progress_bar=r.progress_bar)

    # ------------------------------------------------------------------------------------------------ stages
    def condition(self, r: VideoRequest) -> Conditioning:
        def encode(prompts: list[str]) -> Conditioning:
            return self.encode_prompts(prompts, clip_skip=r.clip_skip, height=r.height, width=r.width,
                                       **r.conditioning_options)

        def text(texts: list[str]):
            cond = encode(texts)
            return cond.context, cond.y

        if is_travel(r.prompt, r.negative_prompt):  # prompt travel: per-frame conditioning
            cond = Conditioning(*per_frame_conditioning(text, r.prompt, r.negative_prompt, r.num_frames, r.use_cfg,
                                                        r.prompt_interpolation))
        else:
            cond = encode([r.negative_prompt, r.prompt] if r.use_cfg else [r.prompt])
        return ip_stage.with_image_tokens(self, r.image_prompt, cond)

    def control_providers(self, r: VideoRequest, cond: Conditioning) -> list:
        """Control residual providers of this call (see denoiser.ControlProvider); none without control inputs.
        They read the text tokens only, as in diffusers (image-prompt tokens are for the UNet's IP-Adapter)."""
        controlnets = [] if r.control is None else control_providers(self, self.controlnets, r.control, r.steps,
                                                                     r.start_step)
        return ip_stage.text_only(self, r.image_prompt, sparsectrl_stage.providers(self, r) + controlnets)

    def make_denoiser(self, r: VideoRequest, cond: Conditioning) -> WindowedDenoiser:
        return WindowedDenoiser(self, cond, cfg_scale=r.cfg_scale, num_frames=r.num_frames,
                                context_length=r.context_length, context_overlap=r.context_overlap,
                                closed_loop=r.closed_loop, motion_scale=r.motion_scale,
                                free_noise=r.free_noise and r.free_noise.windows(),
                                controls=self.control_providers(r, cond), start_step=r.start_step)

    def sample(self, r: VideoRequest, eps, noise: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
        """The sampler loop from the request's start step, with the progress bar and the user's step callback;
        with FreeInit the loop runs several times (pipelines/free_init.py)."""
        runs = [r.free_init.steps(r.steps, k) for k in range(r.free_init.num_iters)] if r.free_init else [r.steps]
        bar = tqdm(total=sum(runs) - r.start_step, desc="denoising", disable=not r.progress_bar)

        def loop(x: torch.Tensor, steps: int, iteration: int) -> torch.Tensor:
            plan = sampling.sampling_plan(r.sampler, steps)
            eps.step = r.start_step  # control providers count steps of this run

            def after_step(i: int, x: torch.Tensor):
                bar.update(1)
                if r.callback_on_step_end is None:
                    return None
                # diffusers' convention: callback(pipe, step, timestep, {"latents": ...}) -> dict, with the latents
                # as its scheduler holds them (sigma space for the Euler samplers)
                scale = sampling.diffusers_state_scale(r.sampler, plan.sigmas_next[i].item())
                result = r.callback_on_step_end(self, i, plan.timesteps[i].item(), {"latents": x * scale})
                latents = result.get("latents") if isinstance(result, dict) else None
                return None if latents is None else latents.to(x.device, torch.float32) / scale

            return sampling.sample(r.sampler, eps, x, steps, init=init, start=r.start_step, generator=r.generator,
                                   callback=after_step)

        try:
            return free_init_sample(r.free_init, loop, noise, r.steps, generator=r.generator,
                                    alphas_cumprod=r.sampler.schedule().alphas_cumprod)
        finally:
            bar.close()

    # ------------------------------------------------------------------------------------------- sampling
    def default_sampling(self) -> dict:
        if self.motion_modules is None:
            return dict(FALLBACK_SAMPLING)
        return {**FALLBACK_SAMPLING, **self.motion_modules.config.sampling_defaults()}

    # ------------------------------------------------------------------------------------------- decoding
    def decode(self, x0: torch.Tensor, *, output_type: str, batch_size: int | None, tiled: bool | None,
               progress_bar: bool):
        from ..video_io import frames_to_pil

        latents = x0 / self.vae.scaling_factor  # the VAE casts to its decoder's dtype
        pixels = latents.shape[-2] * latents.shape[-1]
        # whole frames up to SDXL's native 1024 px, as the original pipelines decode; tiles only beyond that
        tiled = (self.vae_tiling or pixels > 128 * 128) if tiled is None else tiled
        batch_size = batch_size or (1 if self.vae_slicing else None)
        batch_size = batch_size or self.vae.decode_batch_size(latents, 64 if tiled else None)  # memory-bounded
        # each batch goes to the output format as it comes: no whole video in the decoder's dtype or in [-1, 1]
        pil, video = [], None
        for start in tqdm(range(0, latents.shape[0], batch_size), desc="decoding", disable=not progress_bar):
            images = self.vae.decode(latents[start:start + batch_size], tile=tiled)  # (n, 3, H, W) in [-1, 1]
            if output_type == "pil":
                pil += frames_to_pil(images)
            else:
                if video is None:
                    video = torch.empty((latents.shape[0], *images.shape[1:]))
                video[start:start + len(images)] = images.float().clamp_(-1, 1).add_(1).div_(2)
        if output_type == "pil":
            return pil
        return video.permute(0, 2, 3, 1).numpy() if output_type == "np" else video

    # --------------------------------------------------------------------------------------------- checks
    def check_motion_fits(self, motion) -> None:
        unet_sites = self.unet.motion_sites()
        wrong = {name: (ch, unet_sites.get(name)) for name, ch in motion.sites().items() if unet_sites.get(name) != ch}
        if wrong:
            name, (ch, found) = next(iter(wrong.items()))
            raise ConfigError(f"the motion module ({motion.config.version}, for {motion.config.base_family}) does not "
                              f"fit this {self.family} UNet: {len(wrong)} of its sites differ, e.g. {name} has {ch} "
                              f"channels where the UNet has {found}; load a motion module made for {self.family}")
