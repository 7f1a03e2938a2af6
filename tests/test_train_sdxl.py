"""The three training stages on tiny SDXL-shaped models (3 levels, 2 text encoders, pooled text + time ids in ``y``,
the beta module's 15 motion sites): each trains a few steps, and the file it writes loads through ModelManager and
changes the UNet's output to what the trainer ended with."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_train import config, frozen_state, assert_unchanged, data  # noqa: F401  (data: the module fixture)
from tiny_models import tiny_sdxl
from vidsynth.checkpoints import Checkpoint, identify
from vidsynth.manager import ModelManager
from vidsynth.models.motion import MotionModuleSet
from vidsynth.tokenizer import CLIPTokenizer
from vidsynth.train import Trainer, TrainModels, new_motion_modules

pytestmark = pytest.mark.usefixtures("one_thread")
FRAMES = 8


def sdxl_models(motion: str | None) -> TrainModels:
    tiny = tiny_sdxl()
    modules = {"random": tiny.motion, "new": new_motion_modules(tiny.unet), None: None}[motion]
    return TrainModels(tiny.unet, tiny.vae, tiny.text_encoders[0], CLIPTokenizer(), modules,
                       tiny.text_encoders[1], CLIPTokenizer(pad_id=0))


def probe(models: TrainModels, motion, frames: int = FRAMES) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    unet = models.unet
    x = torch.randn(frames, 4, 8, 8, generator=g)
    context = torch.randn(frames, 77, unet.config.context_dim, generator=g)
    y = torch.randn(frames, unet.config.adm_in_channels, generator=g)
    with torch.no_grad():
        return unet(x, torch.full((frames,), 400), context, y, num_frames=frames, motion=motion)


def manager_holding(models: TrainModels, names: list[str]) -> ModelManager:
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.models.update({name: getattr(models, name) for name in names})
    manager.family = "sdxl"
    return manager


def train(data, tmp_path, stage: str, models: TrainModels, **overrides) -> tuple[Trainer, object]:
    frozen = [models.unet, models.vae, models.text_encoder, models.text_encoder_2]
    if stage != "motion-module":
        frozen.append(models.motion_modules)
    before = frozen_state(*frozen)
    settings = {"max_steps": 3, "batch_size": 1, "learning_rate": 1e-3, **overrides}
    trainer = Trainer(stage, config(data, tmp_path / "out", **settings), models)
    out = trainer.run()
    assert_unchanged(before, *frozen)
    return trainer, out


def test_sdxl_motion_lora(data, tmp_path):
    models = sdxl_models("random")
    assert len(models.motion_modules.sites()) == 15
    untrained = probe(models, models.motion_modules)
    trainer, out = train(data, tmp_path, "motion-lora", models, validation_prompts=["a square"], validation_steps=2)
    assert trainer.schedule == ("scaled_linear", 0.00085, 0.020)
    assert identify(Checkpoint(out)).kind == "motion_lora"
    trained = probe(models, models.motion_modules)
    trainer.setup.trainable.remove()
    torch.testing.assert_close(probe(models, models.motion_modules), untrained)
    lora = manager_holding(models, ["unet", "motion_modules"]).load_lora(out)
    assert len(lora.layers) == 15 * 2 * 4
    reloaded = probe(models, models.motion_modules)
    assert not torch.allclose(reloaded, untrained, atol=1e-4 * untrained.abs().max().item())
    torch.testing.assert_close(reloaded, trained, atol=1e-5 * trained.abs().max().item(), rtol=0)
    assert (tmp_path / "out" / "samples" / "step-000003-00.mp4").is_file()


def test_sdxl_motion_module_from_scratch(data, tmp_path):
    models = sdxl_models("new")
    assert models.motion_modules.config.version == "sdxl_beta" and len(models.motion_modules.sites()) == 15
    image_only = probe(models, None)
    torch.testing.assert_close(probe(models, models.motion_modules), image_only, atol=0, rtol=0)
    trainer, out = train(data, tmp_path, "motion-module", models, learning_rate=1e-2)
    trained = probe(models, models.motion_modules)
    info = identify(Checkpoint(out))
    assert info.kind == "motion_module" and info.family == "sdxl"
    manager = manager_holding(models, ["unet"])
    manager.load_models([out])
    loaded = manager.motion_modules
    assert isinstance(loaded, MotionModuleSet) and loaded.config.version == "sdxl_beta"
    reloaded = probe(models, loaded)
    assert not torch.allclose(reloaded, image_only, atol=1e-4 * image_only.abs().max().item())
    torch.testing.assert_close(reloaded, trained, atol=1e-5 * trained.abs().max().item(), rtol=0)


def test_sdxl_domain_adapter(data, tmp_path):
    models = sdxl_models(None)
    untrained = probe(models, None, frames=1)
    trainer, out = train(data, tmp_path, "domain-adapter", models, batch_size=2, learning_rate=1e-2)
    assert trainer.schedule == ("scaled_linear", 0.00085, 0.012)
    state = torch.load(out, weights_only=True)
    # tiny SDXL: no attention at level 0; level 1 one block deep, level 2 and mid two: (2 + 2*2) down + 2 mid +
    # (3 + 3*2) up = 17 transformer blocks, attn1 + attn2, 4 projections, down + up
    assert len(state) == 17 * 2 * 4 * 2
    assert "down_blocks.2.attentions.1.transformer_blocks.1.attn2.processor.to_k_lora.down.weight" in state
    assert identify(Checkpoint(out)).kind == "domain_adapter"
    trained = probe(models, None, frames=1)
    trainer.setup.trainable.remove()
    manager_holding(models, ["unet"]).load_lora(out)
    reloaded = probe(models, None, frames=1)
    assert not torch.allclose(reloaded, untrained, atol=1e-4 * untrained.abs().max().item())
    torch.testing.assert_close(reloaded, trained, atol=1e-5 * trained.abs().max().item(), rtol=0)


def test_an_sdxl_single_file_loads_for_training(data, tmp_path):
    """``base:`` an SDXL single file (tiny, in the file's own key layout): both text encoders come with it and a
    new motion module takes the beta layout."""
    from dataclasses import replace

    from safetensors.torch import save_file
    from tiny_models import BIG_G, CLIP_L, OPEN_CLIP_PREFIX, SDXL_UNET, UNET_PREFIX, VAE_PREFIX
    from tiny_models import tiny_text_encoder, tiny_unet
    from vidsynth.models.vae import AutoencoderKL, VAEConfig

    # what a file can say: 64-channel attention heads in the text encoders, 32 norm groups in the VAE
    encoders = [tiny_text_encoder(replace(CLIP_L, width=64, heads=1)), tiny_text_encoder(replace(BIG_G, width=128,
                                                                                                   heads=2))]
    unet = tiny_unet(replace(SDXL_UNET, context_dim=64 + 128))
    vae = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1))
    state = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), ("conditioner.embedders.0.transformer.", encoders[0]),
                           (OPEN_CLIP_PREFIX, encoders[1])):
        state.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
    base = tmp_path / "tiny_sdxl.safetensors"
    save_file(state, str(base))

    settings = config(data, tmp_path / "out", base=str(base), max_steps=1, batch_size=1)
    models = TrainModels.load(settings)
    assert models.family == "sdxl" and models.text_encoder_2 is not None
    assert models.tokenizer_2.pad_id == 0
    trainer = Trainer("motion-module", settings, models)
    assert trainer.setup.motion.config.version == "sdxl_beta"
    trainer.run()
    assert identify(Checkpoint(tmp_path / "out" / "motion_module.ckpt")).family == "sdxl"


def test_sdxl_cached_text_embeddings_give_the_same_losses(data, tmp_path):
    """The cache keeps both encoders' context and ``y`` (pooled + time ids): losses equal the uncached run's (1e-6)."""
    def losses(cache: bool) -> list[float]:
        trainer, _ = train(data, tmp_path / str(cache), "motion-lora", sdxl_models("random"), max_steps=2,
                           batch_size=2, caption_dropout=0.5, cache_text_embeddings=cache)
        return [float(line.split(",")[1]) for line in (trainer.out_dir / "loss.csv").read_text().splitlines()[1:]]

    plain = losses(False)
    assert len(plain) == 2
    np.testing.assert_allclose(losses(True), plain, rtol=1e-6)
