"""The training loop on accelerate (CPU, one GPU, several GPUs with DDP): epsilon loss on noised latents.

Reproducibility: training sample number ``k`` (counted over the whole run, all processes together) is drawn from
generators seeded by ``(seed, k)`` alone: which clip, its start frame, its caption dropout, its timestep, its
posterior sample and its noise. Process ``r`` of ``N`` takes samples ``(m*N + r)*batch ...`` at micro-batch ``m``, so
N processes with batch b train on exactly the samples one process with batch N*b (or with N accumulation steps)
does, and a run resumed on another process count continues with the next sample. Checkpoints also keep the global
RNG states for anything else.
"""
from __future__ import annotations

import csv
import logging
import random
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError
from ..sampling import NoiseSchedule
from .conditioning import TextConditioner
from .config import TrainConfig
from .data import LatentCache, VideoClipDataset, collate, posterior
from .stages import StageSetup, TrainModels, setup_stage

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class StepBatches(Sampler):
    """Endless micro-batches of ``(index, item seed)`` for process ``rank`` of ``world``, from global sample number
    ``start``: sample ``k`` is position ``k % n`` of epoch ``k // n``'s permutation (seeded by the epoch), so any
    start point is exact."""

    def __init__(self, n: int, batch: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.start, self.rank, self.world = n, batch, seed, start, rank, world
        self._epoch, self._perm = -1, None

    def item(self, k: int) -> tuple[int, int]:
        epoch, pos = divmod(k, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))
        return int(self._perm[pos]), derived_seed(self.seed, k, 1)

    def __iter__(self):
        m = 0
        while True:
            first = self.start + (m * self.world + self.rank) * self.batch
            yield [self.item(first + i) for i in range(self.batch)]
            m += 1


class NoisePredictor(nn.Module):
    """What accelerate wraps (and DDP synchronises): the UNet with the stage's motion modules and trainable part."""

    def __init__(self, unet: nn.Module, setup: StageSetup):
        super().__init__()
        self.unet, self.motion, self.trainable = unet, setup.motion, setup.trainable

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                num_frames: int) -> torch.Tensor:
        pool = self.motion is not None and self.motion.config.pool_resnet_norms
        return self.unet(x, timesteps, context, y, num_frames=num_frames, motion=self.motion, pool_resnet_norms=pool)


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    return Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")


def make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError("use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or set "
                              "use_8bit_adam: false") from None
        optimizer = bitsandbytes.optim.AdamW8bit
    return optimizer(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                     weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


class Trainer:
    """One stage's training run. ``run()`` trains to ``max_steps`` (resuming when configured) and returns the file
    written in the original AnimateDiff layout; ``evaluate()`` gives a deterministic held-out loss."""

    def __init__(self, stage: str, config: TrainConfig, models: TrainModels, *, accelerator=None):
        self.stage, self.config, self.models = stage, config, models
        self.accelerator = acc = accelerator or make_accelerator(config)
        self.device, self.weight_dtype = acc.device, WEIGHT_DTYPES[config.mixed_precision]
        with torch.random.fork_rng(devices=[]):  # new weights: the same on every process and every run
            torch.manual_seed(config.seed)
            self.setup = setup = setup_stage(stage, config, models)
        encoders, tokenizers = models.text_encoders()
        for module in (models.unet, *encoders, setup.motion):
            if module is not None and module is not setup.trainable:
                module.to(self.device, self.weight_dtype)
        # the SDXL VAE overflows in float16 (NaN latents): it encodes in float32, as ModelManager loads it
        sdxl_fp16 = models.family == "sdxl" and self.weight_dtype == torch.float16
        models.vae.to(self.device, torch.float32 if sdxl_fp16 else self.weight_dtype)
        setup.trainable.to(self.device, torch.float32)
        for module in (models.unet, setup.motion):
            if module is not None:
                module.gradient_checkpointing = config.gradient_checkpointing
        models.vae.eval()
        for encoder in encoders:
            encoder.eval()
        self.latent_scale = models.vae.scaling_factor
        self.schedule = config.noise_schedule(stage, models.family)
        self.alphas = NoiseSchedule.from_betas(*self.schedule).alphas_cumprod.to(self.device)
        sdxl = models.family == "sdxl"
        self.text = TextConditioner(encoders, tokenizers, adm_channels=models.unet.config.adm_in_channels if sdxl
                                    else None, size=config.height_width, device=self.device,
                                    cache=config.cache_text_embeddings)
        self.global_batch = config.batch_size * acc.num_processes * config.gradient_accumulation_steps
        self.start_sample = 0
        self.dataset = self.make_dataset(config.data_root, config.captions, on_bad_data=config.on_bad_data)
        self.params = [p for p in setup.trainable.parameters() if p.requires_grad]
        self.model, self.optimizer = acc.prepare(NoisePredictor(models.unet, setup), make_optimizer(config, self.params))
        self.out_dir = Path(config.output_dir)
        self.tensorboard = None

    # ------------------------------------------------------------------------------------------------- data
    def make_dataset(self, root, captions=None, *, on_bad_data: str = "skip") -> VideoClipDataset:
        """A dataset with this run's clip settings (frames, stride, size), e.g. for held-out data."""
        return VideoClipDataset(root, captions, frames=self.setup.frames, stride=self.config.stride,
                                size=self.config.height_width, on_bad_data=on_bad_data)

    def _cache_latents(self) -> None:
        folder = self.config.latent_cache_dir or self.out_dir / "latent_cache"
        cache = LatentCache(folder, self.models.vae, self.config.height_width)
        with self.accelerator.main_process_first():
            encoded = cache.build(self.dataset.samples)
        if encoded:
            log.info("cached the latents of %d videos in %s", encoded, folder)
        self.dataset.cache = cache

    def _cache_text(self) -> None:
        encoded = self.text.prefill(sample.caption for sample in self.dataset.samples)
        log.info("cached the text embeddings of %d captions", encoded)
        if self.device.type != "cpu":  # nothing encodes text any more: free the accelerator's memory
            for encoder in self.text.encoders:
                encoder.to("cpu")

    @torch.no_grad()
    def _inputs(self, batch: dict, caption_dropout: float):
        """Per clip, from its own generator (seeded by the sample's seed): caption dropout, timestep, posterior
        sample, noise. Returns noisy latents ``(b*f, 4, h, w)``, noise, timesteps ``(b*f,)``, context, y, frames."""
        if "moments" in batch:
            moments = batch["moments"].to(self.device)
        else:
            pixels = batch["pixels"]
            moments = posterior(self.models.vae, pixels.flatten(0, 1)).unflatten(0, pixels.shape[:2])
        clips, frames = moments.shape[:2]
        captions, latents, noises, timesteps = [], [], [], []
        for caption, seed, moment in zip(batch["caption"], batch["seed"], moments.float()):
            g = torch.Generator().manual_seed(derived_seed(seed, 3))
            captions.append("" if torch.rand((), generator=g).item() < caption_dropout else caption)
            timesteps.append(torch.randint(0, self.alphas.numel(), (), generator=g))
            mean, std = moment.chunk(2, dim=1)
            if self.config.latent_sampling == "sample":  # as the original: latent_dist.sample()
                mean = mean + std * torch.randn(mean.shape, generator=g).to(self.device)
            latents.append(mean * self.latent_scale)
            noises.append(torch.randn(mean.shape, generator=g).to(self.device))
        latents, noise = torch.cat(latents), torch.cat(noises)
        t = torch.stack(timesteps).to(self.device).repeat_interleave(frames)
        a = self.alphas[t][:, None, None, None]
        context, y = self.text(captions)
        context = context.repeat_interleave(frames, dim=0)
        y = y.repeat_interleave(frames, dim=0) if y is not None else None
        return a.sqrt() * latents + (1 - a).sqrt() * noise, noise, t, context, y, frames

    def loss(self, batch: dict, caption_dropout: float = 0.0) -> torch.Tensor:
        """Epsilon-prediction MSE of one batch; every random draw is the sample's own (see the module docstring)."""
        noisy, noise, t, context, y, frames = self._inputs(batch, caption_dropout)
        pred = self.model(noisy.to(self.weight_dtype), t, context, y, frames)
        return F.mse_loss(pred.float(), noise)

    @torch.no_grad()
    def evaluate(self, dataset: VideoClipDataset | str | Path | None = None, seed: int = 0) -> float:
        """Mean loss over every sample of ``dataset`` (a folder, or this run's data) with fixed clips, noise and
        timesteps for a given ``seed``; no caption dropout."""
        if dataset is None:
            dataset = self.dataset
        elif not isinstance(dataset, VideoClipDataset):
            dataset = self.make_dataset(dataset)
        was_training = self.model.training
        self.model.eval()
        losses = [self.loss(collate([dataset[(i, derived_seed(seed, i))]])).item() for i in range(len(dataset))]
        self.model.train(was_training)
        return float(np.mean(losses))

    # ------------------------------------------------------------------------------------------------ loop
    def run(self, on_step=None) -> Path:
        """Train to ``max_steps``; ``on_step(step, loss)`` is called after every optimizer step. An interruption
        (Ctrl-C) saves a checkpoint of the last finished step before it propagates."""
        config, acc = self.config, self.accelerator
        start = self.resume(config.resume) if config.resume else 0
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._start_log(start)
            (self.out_dir / "bad_data.txt").write_text("".join(f"{bad}\n" for bad in self.dataset.bad))
        acc.print(f"training {self.stage} ({self.models.family}): global batch {self.global_batch} = batch_size "
                  f"{config.batch_size} x {acc.num_processes} process(es) x {config.gradient_accumulation_steps} "
                  f"accumulation step(s); steps {start}..{config.max_steps}; noise schedule {self.schedule}")
        if config.cache_latents:
            self._cache_latents()
        if config.cache_text_embeddings:
            self._cache_text()
        accum = config.gradient_accumulation_steps
        batches = StepBatches(len(self.dataset), config.batch_size, config.seed, self.start_sample,
                              acc.process_index, acc.num_processes)
        loader = iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=config.num_workers,
                                 collate_fn=collate))
        self.model.train()
        step = start
        validated = False
        try:
            while step < config.max_steps:
                lr = config.learning_rate * min(1.0, (step + 1) / config.lr_warmup_steps) \
                    if config.lr_warmup_steps else config.learning_rate
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                total = torch.zeros((), device=self.device)
                for micro in range(accum):
                    sync = nullcontext() if micro == accum - 1 else acc.no_sync(self.model)
                    with sync:
                        loss = self.loss(next(loader), config.caption_dropout)
                        acc.backward(loss / accum)
                    total += loss.detach() / accum
                if config.max_grad_norm:
                    acc.clip_grad_norm_(self.params, config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                self.start_sample += self.global_batch
                value = acc.gather(total[None]).mean().item()
                if step % config.log_every == 0:
                    self._log(step, value, lr)
                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    self.save_checkpoint(step)
                validated = bool(config.validation_every) and step % config.validation_every == 0
                if validated:
                    self.validate(step)
                    acc.wait_for_everyone()  # other ranks wait here, not in the next step's gradient all-reduce
                if on_step is not None:
                    on_step(step, value)
        except KeyboardInterrupt:
            if step > start:
                self.save_checkpoint(step)
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
        out = self.config.output_file(self.stage)
        if acc.is_main_process:  # the result is written first: a failing validation must not cost it
            save_file(self.setup.export(), out)
        acc.wait_for_everyone()
        if not validated:
            self.validate(step)
            acc.wait_for_everyone()
        return out

    # ------------------------------------------------------------------------------------- checkpoints, logs
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self, step: int) -> Path:
        """``checkpoints/step-NNNNNN/``: ``state.pt`` (trainable weights, optimizer, step, RNG, config) and the
        output file in the AnimateDiff layout as it stands at this step."""
        acc = self.accelerator
        folder = self.checkpoint_dir / f"step-{step:06d}"
        if acc.is_main_process:
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            state = {"stage": self.stage, "step": step, "samples_seen": self.start_sample,
                     "global_batch": self.global_batch, "trainable": self.setup.trainable.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "rng": _rng_state(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "config": self.config.to_dict()}
            torch.save(state, tmp / "state.pt")
            save_file(self.setup.export(), tmp / self.config.output_file(self.stage).name)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.replace(folder)
            if self.config.keep_checkpoints:
                for old in _checkpoints(self.checkpoint_dir)[:-self.config.keep_checkpoints]:
                    shutil.rmtree(old)
        acc.wait_for_everyone()
        return folder

    def resume(self, where: str | Path) -> int:
        """Load a checkpoint folder (or ``"latest"`` in ``output_dir/checkpoints``); returns its step."""
        if str(where) == "latest":
            found = _checkpoints(self.checkpoint_dir)
            if not found:
                log.warning("resume: latest asked for, but %s holds no checkpoint: starting at step 0",
                            self.checkpoint_dir)
                return 0
            where = found[-1]
        path = Path(where)
        path = path / "state.pt" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"resume: {str(path)!r} does not exist; give a checkpoints/step-NNNNNN folder or 'latest'")
        try:  # our own checkpoint format: RNG states and the config need the full unpickler
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ConfigError(f"resume: {path} is not a vidsynth training checkpoint ({err})") from None
        if not isinstance(state, dict) or state.get("stage") != self.stage:
            stage = state.get("stage") if isinstance(state, dict) else None
            raise ConfigError(f"resume: {path} is a {stage} checkpoint, not {self.stage}")
        try:
            self.setup.trainable.load_state_dict(state["trainable"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ConfigError(f"resume: {path} does not fit this configuration (rank, motion module or layout "
                              f"changed?): {str(err).splitlines()[0]}") from None
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step = int(state["step"])
        self.start_sample = int(state.get("samples_seen", step * self.global_batch))
        if state.get("global_batch", self.global_batch) != self.global_batch:
            log.warning("resume: the checkpoint trained with global batch %s, this run has %d: training continues "
                        "with the next sample, but the loss curve will differ from the original run's",
                        state.get("global_batch"), self.global_batch)
        log.info("resumed %s at step %d (%d samples seen)", path, step, self.start_sample)
        return step

    @property
    def loss_log(self) -> Path:
        return self.out_dir / "loss.csv"

    def _start_log(self, start: int) -> None:
        """A fresh loss.csv, or on resume the rows up to the resumed step (a crashed run may have logged beyond)."""
        rows = []
        if start and self.loss_log.exists():
            with self.loss_log.open(newline="") as handle:
                rows = [r for r in csv.reader(handle)][1:]
            rows = [r for r in rows if int(r[0]) <= start]
        with self.loss_log.open("w", newline="") as handle:
            csv.writer(handle).writerows([["step", "loss", "lr"], *rows])
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start + 1 if start else None)
        except ImportError:  # TensorBoard is optional
            self.tensorboard = None

    def _log(self, step: int, loss: float, lr: float) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.loss_log.open("a", newline="") as handle:
            csv.writer(handle).writerow([step, repr(loss), repr(lr)])
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss", loss, step)
            self.tensorboard.add_scalar("lr", lr, step)

    # -------------------------------------------------------------------------------------------- samples
    @torch.no_grad()
    def validate(self, step: int) -> list[Path]:
        """Render the validation prompts with the model as it stands; ``samples/step-NNNNNN-PP.<format>``."""
        config = self.config
        if not config.validation_prompts or not self.accelerator.is_main_process:
            return []
        from ..pipelines.sd_video import SDVideoPipeline
        from ..pipelines.sdxl_video import SDXLVideoPipeline
        from ..video_io import save_video

        models, motion = self.models, self.setup.motion
        encoders, tokenizers = models.text_encoders()
        for encoder in encoders:  # cached text embeddings may have sent them to the CPU
            encoder.to(self.device)
        pipeline = SDXLVideoPipeline if models.family == "sdxl" else SDVideoPipeline
        pipe = pipeline(models.unet, models.vae, encoders, tokenizers, motion, device=self.device,
                        dtype=self.weight_dtype)
        frames = 1 if motion is None else (config.validation_frames or config.frames)
        height, width = config.validation_height_width()
        written = []
        self.model.eval()
        with self.accelerator.autocast():
            for i, prompt in enumerate(config.validation_prompts):
                video = pipe(prompt, num_frames=frames, height=height, width=width,
                             num_inference_steps=config.validation_steps, cfg_scale=config.validation_cfg,
                             seed=config.seed, progress_bar=False, allow_static=motion is None)
                out = self.out_dir / "samples" / f"step-{step:06d}-{i:02d}.{config.validation_format}"
                written.append(save_video(video, out, fps=8))
        self.model.train()
        if self.config.cache_text_embeddings:
            self._cache_text()
        return written


def save_file(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A flat tensor dict as ``.safetensors`` or (any other suffix) a ``torch.save`` file, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from ..checkpoints import write_safetensors  # into tmp itself: safetensors' save_file makes its own temporary
        write_safetensors(state, tmp)
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    return path


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
