"""Training the three AnimateDiff stages on tiny models and a synthetic moving-square dataset (CPU)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from vidsynth.checkpoints import Checkpoint, identify
from vidsynth.cli import main as cli_main
from vidsynth.errors import ConfigError
from vidsynth.manager import ModelManager
from vidsynth.models.motion import MotionModuleSet
from vidsynth.models.text import CLIPTextModel, TextEncoderConfig
from vidsynth.models.unet import UNetConfig, UNetModel
from vidsynth.models.vae import AutoencoderKL, VAEConfig
from vidsynth.tokenizer import CLIPTokenizer
from vidsynth.train import TrainConfig, Trainer, TrainModels, VideoClipDataset, load_config, new_motion_modules
from vidsynth.train.data import collate
from vidsynth.video_io import load_video, save_video

FRAMES, SIZE, VIDEO_FRAMES = 8, 64, 10
LOSS_DROP = 0.15  # held-out loss must fall by at least 15% of its starting value
TINY_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       transformer_depth=(1, 1), transformer_depth_middle=1, context_dim=32, num_heads=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def moving_square(x0: int, color: tuple[int, int, int], frames: int = VIDEO_FRAMES) -> np.ndarray:
    video = np.full((frames, SIZE, SIZE, 3), 20, np.uint8)
    for i in range(frames):
        x = x0 + 4 * i
        video[i, 24:40, x:x + 16] = color
    return video


def write_set(folder: Path, starts_colors, suffixes) -> Path:
    folder.mkdir(parents=True)
    rows = [["path", "caption"]]
    for k, ((x0, color), suffix) in enumerate(zip(starts_colors, suffixes)):
        name = f"clip{k}{suffix}"
        save_video(moving_square(x0, color), folder / name, fps=8)
        rows.append([name.rstrip("/"), "a bright square moving right"])
    with (folder / "captions.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_data")
    colors = [(255, 60, 60), (60, 255, 60), (60, 60, 255), (255, 255, 60), (60, 255, 255), (255, 60, 255)]
    train = write_set(root / "train", [(2 * k, c) for k, c in enumerate(colors)], [".mp4", ".gif", "/"] * 2)
    (train / "broken.mp4").write_bytes(b"not a video at all")  # a bad file in the training folder is skipped
    with (train / "captions.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow(["broken.mp4", "a broken clip"])
    heldout = write_set(root / "heldout", [(1, (200, 200, 200)), (7, (255, 128, 0)), (11, (128, 0, 255))],
                        [".gif"] * 3)
    return {"train": train, "heldout": heldout}


def tiny_models(motion: str | None) -> TrainModels:
    """motion: None, "random" (a trained-looking module: non-zero output projections) or "new" (zero-initialised)."""
    torch.manual_seed(0)
    unet = UNetModel(TINY_UNET)
    vae = AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=4))
    text = CLIPTextModel(TextEncoderConfig(49408, 32, 1, 2, 77, "quick_gelu", None, "hf"))
    modules = None
    if motion is not None:
        modules = new_motion_modules(unet, "v2", pe_length=16)
        if motion == "random":
            modules = MotionModuleSet(modules.config)
    return TrainModels(unet, vae.eval(), text.eval(), CLIPTokenizer(), modules)


def config(data, out: Path, **overrides) -> TrainConfig:
    values = dict(data_root=str(data["train"]), frames=FRAMES, stride=1, size=SIZE, caption_dropout=0.0,
                  learning_rate=1e-2, max_steps=30, batch_size=2, rank=8, output_dir=str(out), checkpoint_every=1000,
                  device="cpu", seed=0)
    return TrainConfig(**{**values, **overrides})


def frozen_state(*modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.clone() for i, m in enumerate(modules) if m is not None for k, v in m.state_dict().items()}


def assert_unchanged(before: dict[str, torch.Tensor], *modules) -> None:
    after = frozen_state(*modules)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen weights changed: {changed[:5]}"


def probe(unet, motion, frames: int = FRAMES) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(frames, 4, 8, 8, generator=g), torch.randn(frames, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.full((frames,), 400), context, num_frames=frames, motion=motion)


def train_and_check(data, tmp_path, stage: str, motion: str | None, **overrides) -> tuple[Trainer, Path]:
    """Train; the held-out loss must fall by LOSS_DROP; the frozen weights must not change."""
    models = tiny_models(motion)
    frozen = [models.unet, models.vae, models.text_encoder]
    if stage != "motion-module":
        frozen.append(models.motion_modules)
    before_state = frozen_state(*frozen)
    trainer = Trainer(stage, config(data, tmp_path / "out", **overrides), models)
    heldout = trainer.make_dataset(data["heldout"])
    before = trainer.evaluate(heldout)
    out = trainer.run()
    after = trainer.evaluate(heldout)
    print(f"{stage}: held-out loss {before:.4f} -> {after:.4f}")
    assert after < (1 - LOSS_DROP) * before, f"{stage}: held-out loss {before:.4f} -> {after:.4f}"
    assert_unchanged(before_state, *frozen)
    assert all(p.requires_grad for p in trainer.setup.trainable.parameters())
    assert not any(p.requires_grad for m in frozen if m is not None for p in m.parameters())
    return trainer, out


def reload_through_manager(models: TrainModels, path: Path, components: list[str]):
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.models.update({name: getattr(models, name) for name in components})
    return manager.load_lora(path)


# ------------------------------------------------------------------------------------------------------- stages

def test_motion_lora(data, tmp_path):
    trainer, out = train_and_check(data, tmp_path, "motion-lora", "random", validation_prompts=["a square"],
                                   validation_steps=2, validation_every=30)
    models = trainer.models
    state = torch.load(out, weights_only=True)
    sites = models.motion_modules.sites()
    expected = {f"{site}.temporal_transformer.transformer_blocks.0.attention_blocks.{b}.processor.{p}_lora.{h}.weight"
                for site in sites for b in (0, 1) for p in ("to_q", "to_k", "to_v", "to_out") for h in ("down", "up")}
    assert set(state) == expected
    key = next(iter(sites)) + ".temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora"
    channels = sites[next(iter(sites))]
    assert state[f"{key}.down.weight"].shape == (8, channels) and state[f"{key}.up.weight"].shape == (channels, 8)
    assert identify(Checkpoint(out)).kind == "motion_lora"

    trained = probe(models.unet, models.motion_modules)
    trainer.setup.trainable.remove()
    assert not torch.allclose(probe(models.unet, models.motion_modules), trained, atol=1e-4)  # the LoRA matters
    lora = reload_through_manager(models, out, ["unet", "motion_modules"])
    assert len(lora.layers) == len(expected) // 2
    reloaded = probe(models.unet, models.motion_modules)
    torch.testing.assert_close(reloaded, trained, atol=1e-5 * trained.abs().max().item(), rtol=0)

    sample = tmp_path / "out" / "samples" / "step-000030-00.mp4"
    assert len(load_video(sample)) == FRAMES
    with (tmp_path / "out" / "loss.csv").open() as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == list(range(1, 31))
    assert (tmp_path / "out" / "bad_data.txt").read_text().startswith(str(data["train"] / "broken.mp4"))


def test_motion_module_from_scratch(data, tmp_path):
    models = tiny_models("new")
    # zero output projections: the untrained video model is the image model, frame by frame, exactly
    assert torch.equal(probe(models.unet, models.motion_modules), probe(models.unet, None))

    trainer, out = train_and_check(data, tmp_path, "motion-module", "new", learning_rate=2e-3)
    motion = trainer.models.motion_modules
    assert not torch.allclose(probe(trainer.models.unet, motion), probe(trainer.models.unet, None), atol=1e-4)
    state = torch.load(out, weights_only=True)
    fresh = MotionModuleSet(motion.config)
    assert set(state) == set(fresh.state_dict())
    assert any(k.endswith("attention_blocks.1.pos_encoder.pe") for k in state)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(probe(trainer.models.unet, fresh), probe(trainer.models.unet, motion))


def test_domain_adapter(data, tmp_path):
    trainer, out = train_and_check(data, tmp_path, "domain-adapter", None, batch_size=4, learning_rate=5e-3)
    state = torch.load(out, weights_only=True)
    # diffusers-style UNet names, as v3_sd15_adapter.ckpt: 2 levels x 1 block down, 1 mid, 2 levels x 2 up = 7
    # transformer blocks, attn1 + attn2, 4 projections, down + up
    assert len(state) == 7 * 2 * 4 * 2
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight" in state
    assert state["mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight"].shape == (64, 8)
    assert identify(Checkpoint(out)).kind == "domain_adapter"

    models = trainer.models
    trained = probe(models.unet, None, frames=1)
    trainer.setup.trainable.remove()
    reload_through_manager(models, out, ["unet"])
    torch.testing.assert_close(probe(models.unet, None, frames=1), trained,
                               atol=1e-5 * trained.abs().max().item(), rtol=0)


def test_interrupt_and_resume_continue_the_loss_curve_exactly(data, tmp_path):
    settings = dict(max_steps=6, batch_size=2, gradient_accumulation_steps=2, caption_dropout=0.5, rank=4)
    whole = tmp_path / "whole"
    full = Trainer("motion-lora", config(data, whole, **settings), tiny_models("random")).run()

    split = tmp_path / "split"

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer("motion-lora", config(data, split, **settings), tiny_models("random")).run(on_step=interrupt)
    assert (split / "checkpoints" / "step-000003" / "state.pt").is_file()
    resumed = Trainer("motion-lora", config(data, split, resume="latest", **settings), tiny_models("random")).run()

    assert (split / "loss.csv").read_text() == (whole / "loss.csv").read_text()
    assert len((whole / "loss.csv").read_text().splitlines()) == 7
    a, b = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = dict(settings, rank=8)
    with pytest.raises(ConfigError, match="does not fit this configuration"):
        Trainer("motion-lora", config(data, split, resume="latest", **changed), tiny_models("random")).run()


def test_gradient_checkpointing_gives_the_same_losses(data, tmp_path):
    def losses(checkpointing: bool) -> list[float]:
        out = tmp_path / str(checkpointing)
        Trainer("motion-module", config(data, out, max_steps=2, gradient_checkpointing=checkpointing),
                tiny_models("new")).run()
        with (out / "loss.csv").open() as handle:
            return [float(row["loss"]) for row in csv.DictReader(handle)]

    plain, checkpointed = losses(False), losses(True)
    assert len(plain) == 2
    np.testing.assert_allclose(checkpointed, plain, rtol=1e-5)  # recomputation may reorder float sums


# ----------------------------------------------------------------------------------------------------- bad data

def test_bad_data_is_reported_by_path_and_skipped_or_refused(data, tmp_path, caplog):
    root = tmp_path / "bad"
    root.mkdir()
    save_video(moving_square(0, (255, 0, 0)), root / "good.gif", fps=8)
    save_video(moving_square(0, (0, 255, 0)), root / "spare.gif", fps=8)
    save_video(moving_square(0, (0, 0, 255), frames=3), root / "short.gif", fps=8)
    save_video(moving_square(0, (9, 9, 9)), root / "uncaptioned.gif", fps=8)
    save_video(moving_square(0, (9, 9, 9)), root / "empty_caption.gif", fps=8)
    (root / "broken.mp4").write_bytes(b"\x00" * 64)
    (root / "captions.jsonl").write_text("\n".join([
        '{"path": "good.gif", "caption": "red square"}', '{"path": "spare.gif", "caption": "green square"}',
        '{"path": "short.gif", "caption": "too short"}', '{"path": "broken.mp4", "caption": "broken"}',
        '{"path": "empty_caption.gif", "caption": ""}', '{"path": "gone.mp4", "caption": "missing file"}']))
    reasons = {"short.gif": "too short", "broken.mp4": "unreadable", "uncaptioned.gif": "no caption",
               "empty_caption.gif": "missing caption", "gone.mp4": "does not exist"}

    with caplog.at_level(logging.WARNING):
        dataset = VideoClipDataset(root, frames=FRAMES, stride=1, size=(SIZE, SIZE))
    assert sorted(s.path.name for s in dataset.samples) == ["good.gif", "spare.gif"]
    assert sorted(b.path.name for b in dataset.bad) == sorted(reasons)
    for bad in dataset.bad:
        assert reasons[bad.path.name] in bad.reason
        assert str(bad.path) in caplog.text

    with pytest.raises(ConfigError) as refused:
        VideoClipDataset(root, frames=FRAMES, stride=1, size=(SIZE, SIZE), on_bad_data="error")
    assert all(name in str(refused.value) for name in reasons)

    # a file that breaks after the check: reported by path, the next sample is served, no crash
    (root / "good.gif").write_bytes(b"GIF89a broken")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        items = [dataset[(i, i)] for i in range(len(dataset))]
    assert all(Path(item["path"]).name == "spare.gif" and item["pixels"].shape == (FRAMES, 3, SIZE, SIZE)
               for item in items)
    assert str(root / "good.gif") in caplog.text


# ------------------------------------------------------------------------------------------------------- config

def write_tiny_sd15_file(path: Path, levels: int = 2) -> None:
    """A single-file checkpoint that identifies as SD 1.5 (context 768) with tiny UNet, VAE and one-layer CLIP;
    ``levels=4``: SD 1.5's block structure (2 resnets per level), so motion-module files for it are recognised."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    structure = dict(channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1)) if levels == 2 else \
        dict(channel_mult=(1, 2, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 1, 0))
    unet = UNetModel(UNetConfig(in_channels=4, out_channels=4, model_channels=32, transformer_depth_middle=1,
                                context_dim=768, num_heads=8, **structure))
    vae = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1))
    text = CLIPTextModel(TextEncoderConfig(49408, 768, 1, 12, 77, "quick_gelu", None, "hf"))
    state = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", text)):
        state.update({prefix + k: v.half().contiguous() for k, v in module.state_dict().items()})
    save_file(state, str(path))


def test_cli_trains_from_a_single_file_checkpoint_with_cached_latents(data, tmp_path):
    base = tmp_path / "tiny_sd15.safetensors"
    write_tiny_sd15_file(base)
    out = tmp_path / "run"
    path = tmp_path / "train.yaml"
    path.write_text(f"base: {base}\ndata_root: {data['train']}\nframes: {FRAMES}\nstride: 1\nsize: {SIZE}\n"
                    f"max_steps: 3\nlearning_rate: 1e-3\ncache_latents: true\ndevice: cpu\noutput_dir: {out}\n"
                    f"motion_version: v3\nnew_motion_pe_length: 16\n")
    assert cli_main(["train", "motion-module", "--config", str(path)]) == 0
    caches = list((out / "latent_cache").glob("*.pt"))
    cached = torch.load(caches[0], weights_only=True)  # the posterior: mean and standard deviation
    assert len(caches) == 6 and cached.shape == (VIDEO_FRAMES, 8, 8, 8) and (cached[:, 4:] > 0).all()
    state = torch.load(out / "motion_module.ckpt", weights_only=True)
    assert not any(k.startswith("mid_block") for k in state)  # v3 layout: no mid-block module
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([base])
    motion = new_motion_modules(manager.unet, "v3", 16)
    motion.load_state_dict(state, strict=True)
    with (out / "loss.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_config_names_unknown_keys_and_the_cli_reports_errors(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text("data_root: videos\nlearning_rat: 1e-4\nframse: 16\n")
    with pytest.raises(ConfigError, match=r"'framse' \(did you mean 'frames'\?\).*'learning_rat'"):
        load_config(path)
    assert cli_main(["train", "motion-lora", "--config", str(path)]) == 2
    assert "learning_rat" in capsys.readouterr().err

    path.write_text("data_root: videos\nframes: 16\nmixed_precision: fp8\n")
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(path)
    path.write_text(f"data_root: {tmp_path}\nlearning_rate: 0.001\nvalidation_prompts: [a, b]\n")
    loaded = load_config(path)
    assert loaded.learning_rate == 1e-3 and loaded.validation_prompts == ["a", "b"] and loaded.frames == 16
    assert cli_main(["train", "motion-module", "--config", str(path)]) == 2
    assert "base" in capsys.readouterr().err


def test_config_types_are_checked_for_optional_and_list_settings():
    from vidsynth.train.config import TrainConfig

    assert TrainConfig.from_dict({"validation_prompts": "a cat"}).validation_prompts == ["a cat"]
    assert TrainConfig.from_dict({"rank": None}).rank is None
    for bad in ({"rank": "abc"}, {"rank": 64.0}, {"validation_prompts": [1, 2]}, {"validation_format": "mov"},
                {"lr_warmup_steps": -1}):
        with pytest.raises(ConfigError):
            TrainConfig.from_dict(bad)


def test_jsonl_rows_that_are_not_objects_are_refused(tmp_path):
    from vidsynth.train.data import read_captions

    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"path": "a.mp4", "caption": "a cat"}\n["b.mp4", "a dog"]\n')
    with pytest.raises(ConfigError, match=r"rows \[2\]"):
        read_captions(captions)


# ------------------------------------------------------------------------------------- fidelity to the original

@pytest.mark.parametrize("stage, family, schedule", [
    ("motion-lora", "sd15", ("linear", 0.00085, 0.012)),          # configs/training/v1/training.yaml
    ("motion-module", "sd15", ("linear", 0.00085, 0.012)),
    ("domain-adapter", "sd15", ("scaled_linear", 0.00085, 0.012)),  # configs/training/v1/image_finetune.yaml
    ("motion-lora", "sdxl", ("scaled_linear", 0.00085, 0.020)),   # the sdxl branch's schedule for mm_sdxl_v10_beta
    ("domain-adapter", "sdxl", ("scaled_linear", 0.00085, 0.012)),  # SDXL base's own
])
def test_noise_schedule_per_stage_is_the_originals(stage, family, schedule):
    """The trainer's cumulative alphas equal diffusers' DDPMScheduler built with the original config's betas
    (max difference 0 to ~1e-7); a setting given in the config wins over the stage's default."""
    from diffusers import DDPMScheduler
    from vidsynth.sampling import NoiseSchedule

    resolved = TrainConfig().noise_schedule(stage, family)
    assert resolved == schedule
    name, start, end = schedule
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=name)
    torch.testing.assert_close(NoiseSchedule.from_betas(*resolved).alphas_cumprod, reference.alphas_cumprod,
                               atol=1e-6, rtol=0)
    assert TrainConfig(beta_schedule="linear").noise_schedule(stage, family) == ("linear", start, end)


@pytest.mark.parametrize("sampling", ["sample", "mean"])
def test_latents_are_drawn_from_the_vae_posterior(data, tmp_path, sampling):
    """As the original train.py (``vae.encode(x).latent_dist.sample()``): the clean latent under the noise is
    mean + std * N(0, 1) of diffusers' posterior for the same VAE weights; ``latent_sampling: mean`` takes the mean
    (agreement with diffusers' mean 1e-5 of its scale)."""
    from tiny_models import diffusers_vae

    trainer = Trainer("motion-lora", config(data, tmp_path, latent_sampling=sampling), tiny_models("random"))
    batch = collate([trainer.dataset[(0, 123)]])
    noisy, noise, t, _, _, frames = trainer._inputs(batch, 0.0)
    a = trainer.alphas[t][:, None, None, None]
    clean = (noisy - (1 - a).sqrt() * noise) / a.sqrt() / trainer.latent_scale
    with torch.no_grad():
        posterior = diffusers_vae(trainer.models.vae, trainer.latent_scale).encode(batch["pixels"][0]).latent_dist
    z = (clean - posterior.mean) / posterior.std
    scale = posterior.mean.abs().max().item()
    if sampling == "mean":
        assert z.abs().max() * posterior.std.max() < 1e-5 * scale
    else:
        assert abs(z.mean().item()) < 0.1 and 0.9 < z.std().item() < 1.1, (z.mean(), z.std())
        again = trainer._inputs(collate([trainer.dataset[(0, 124)]]), 0.0)  # another draw: another sample
        assert not torch.allclose(again[0], noisy)


# ------------------------------------------------------------------------------------------------ memory features

def test_gradient_checkpointing_recomputes_unet_blocks_and_motion_modules(data, tmp_path, monkeypatch):
    """With the flag, every UNet block and motion module runs its forward a second time in the backward pass
    (that is what frees its activations); without it, once. (Counted on the forward methods: torch's checkpoint
    recomputes without firing module hooks.)"""
    from vidsynth.models.motion import MotionModule
    from vidsynth.models.unet import UNetBlock

    counts = {UNetBlock: 0, MotionModule: 0}
    for cls in counts:
        def counted(self, *args, _forward=cls.forward, _cls=cls, **kwargs):
            counts[_cls] += 1
            return _forward(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", counted)

    def forward_counts(checkpointing: bool) -> tuple[int, int]:
        trainer = Trainer("motion-lora", config(data, tmp_path / str(checkpointing), max_steps=1, batch_size=1,
                                                gradient_checkpointing=checkpointing), tiny_models("random"))
        before = dict(counts)
        trainer.run()
        return counts[UNetBlock] - before[UNetBlock], counts[MotionModule] - before[MotionModule]

    blocks, motions = forward_counts(False)
    assert (blocks, motions) == (9, 7)  # 4 input blocks, the middle one, 4 output blocks; 2 + 1 + 4 motion sites
    # every block again except conv_in (no gradient flows through it, so nothing asks for its activations);
    # motion modules at least once more (their own checkpoint, and the enclosing block's recomputation): measured
    # (17, 16)
    recomputed = forward_counts(True)
    print(f"forward calls per step without / with checkpointing: {(blocks, motions)} / {recomputed}")
    assert recomputed[0] == 2 * blocks - 1 and recomputed[1] >= 2 * motions


def test_cached_text_embeddings_give_the_same_losses_without_the_encoder(data, tmp_path):
    """cache_text_embeddings: every caption is encoded once before training (with caption dropout and a batch of
    captions of different chunk counts, the padded cache equals encoding them together: losses equal to 1e-6)."""
    long_caption = "a bright square moving right " * 20  # 2 chunks of 77 tokens next to 1-chunk captions
    captions = data["train"] / "captions_long.csv"
    rows = (data["train"] / "captions.csv").read_text().splitlines()
    captions.write_text("\n".join(rows[:2] + [rows[2].split(",")[0] + "," + long_caption] + rows[3:]) + "\n")

    def run(cache: bool) -> tuple[list[float], int]:
        models = tiny_models("random")
        out = tmp_path / str(cache)
        trainer = Trainer("motion-lora", config(data, out, captions=str(captions), max_steps=3, caption_dropout=0.5,
                                                batch_size=3, cache_text_embeddings=cache), models)
        calls = []
        trainer.run(on_step=lambda step, loss: calls.append(0))
        calls_at_start = []
        models.text_encoder.register_forward_hook(lambda *_: calls_at_start.append(0))
        trainer.loss(collate([trainer.dataset[(i, i)] for i in range(3)]))
        with (out / "loss.csv").open() as handle:
            return [float(row["loss"]) for row in csv.DictReader(handle)], len(calls_at_start)

    plain, encoder_calls = run(False)
    cached, cached_calls = run(True)
    assert encoder_calls == 1 and cached_calls == 0
    np.testing.assert_allclose(cached, plain, rtol=1e-6)


def test_8bit_adam_is_optional_and_used_when_installed(data, tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        Trainer("motion-lora", config(data, tmp_path, use_8bit_adam=True), tiny_models("random"))

    class AdamW8bit(torch.optim.AdamW):  # stands in for bitsandbytes' optimizer: same constructor
        made = []

        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            AdamW8bit.made.append(kwargs)

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bit))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    trainer = Trainer("motion-lora", config(data, tmp_path, use_8bit_adam=True, adam_epsilon=1e-6),
                      tiny_models("random"))
    assert isinstance(trainer.optimizer.optimizer, AdamW8bit) and AdamW8bit.made[0]["eps"] == 1e-6
