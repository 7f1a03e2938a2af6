"""AutoencoderKL: parity with diffusers, the real checkpoint layouts, tiled / chunked / upcast decoding."""
from __future__ import annotations

import json

import pytest
import torch

from vidsynth.errors import CheckpointError, ConfigError
from vidsynth.models.vae import AutoencoderKL, VAEConfig, _blend_weights, _tile_spans

PREFIX = "first_stage_model."


def randomised(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """Default-initialised convs; norm weights ~ 1 + N(0, 0.1^2) and all biases ~ N(0, 0.1^2), so every tensor is
    exercised."""
    torch.manual_seed(seed)
    model = AutoencoderKL(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if ".norm" in name and name.endswith("weight") else 0.0))
    return model


@pytest.fixture(scope="module")
def small() -> AutoencoderKL:
    """8x downscale like the real VAE, but narrow (4-8 channels, 2 groups) so 1024x1024 images decode in seconds."""
    return randomised(VAEConfig(base_channels=4, channel_mult=(1, 1, 1, 2), num_res_blocks=1, norm_groups=2))


def test_parity_with_diffusers():
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = randomised(VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=2))
    theirs = DiffusersVAE(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, latent_channels=4,
                          norm_num_groups=32).eval()
    # the converter finds the VAE by its LDM prefix
    converted = convert_ldm_vae_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, theirs.config)
    theirs.load_state_dict(converted, strict=True)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 24, 40) * 2 - 1
    latents = torch.randn(2, 4, 10, 14)
    with torch.no_grad():
        mean, expected_mean = ours.encode(images), theirs.encode(images).latent_dist.mean
        decoded, expected = ours.decode(latents), theirs.decode(latents).sample
        sampled = ours.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
        expected_sample = theirs.encode(images).latent_dist.sample(torch.Generator().manual_seed(3))
    for got, want in ((mean, expected_mean), (decoded, expected), (sampled, expected_sample)):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # measured ~2e-6 relative
    assert decoded.shape == (2, 3, 20, 28) and not torch.equal(sampled, mean)


@pytest.mark.parametrize("name", ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"])
def test_config_and_keys_match_real_layout(shared_dir, name):
    tensors = json.loads((shared_dir / "checkpoint-layouts" / f"{name}.json").read_text())["tensors"]
    shapes = {k[len(PREFIX):]: tuple(v) for k, v in tensors.items() if k.startswith(PREFIX)}
    config = VAEConfig.from_state_dict(shapes)
    assert (config.base_channels, config.channel_mult, config.latent_channels) == (128, (1, 2, 4, 4), 4)
    assert (config.num_res_blocks, config.in_channels, config.out_channels, config.downscale) == (2, 3, 3, 8)
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    with pytest.raises(CheckpointError, match="Strip the 'first_stage_model.' prefix"):
        VAEConfig.from_state_dict({PREFIX + k: v for k, v in shapes.items()})
    unet_like = {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(CheckpointError, match="Not an LDM AutoencoderKL"):
        VAEConfig.from_state_dict(unet_like)


def test_tiled_decode_close_to_untiled(small):
    torch.manual_seed(2)
    latents = torch.randn(1, 4, 24, 32)
    with torch.no_grad():
        full = small.decode(latents)
        whole_tile = small.decode(latents, tile=True, tile_size=32)
        tiled = small.decode(latents, tile_size=20, tile_overlap=10)  # automatic: 32 > 20 -> 2x2 tiles

    assert torch.equal(whole_tile, full)
    # GroupNorm statistics, the mid attention and zero padding are per tile, so tiling is close, not exact.
    # Measured: error mean 0.03 / max 0.95 for an output with mean |x| 0.26, max 5.0 (random weights, a tiny
    # model whose receptive field exceeds the overlap: harsher than trained SD weights with 64/16 tiles).
    err = (tiled - full).abs()
    assert err.mean() < 0.2 * full.abs().mean() and err.max() < 0.3 * full.abs().max()
    # no seams: the largest jump between neighbouring pixels is not larger than in the untiled image
    for dim in (-1, -2):
        assert tiled.diff(dim=dim).abs().max() < 1.25 * full.diff(dim=dim).abs().max()


@pytest.mark.parametrize("length,tile,overlap", [(32, 20, 10), (21, 8, 3), (128, 64, 16), (70, 64, 16)])
def test_tiles_cover_and_blend_weights_sum_to_one(length, tile, overlap):
    spans = _tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length and all(b - a == tile for a, b in spans)
    assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))
    total, cover = torch.zeros(length * 8), torch.zeros(length * 8)
    for (a, b), wt in zip(spans, _blend_weights(spans, 8, total)):
        assert wt.min() > 0
        total[a * 8:b * 8] += wt
        cover[a * 8:b * 8] += 1
    # where two tiles meet, sin^2 + cos^2 = 1; where three overlap (32, 20, 10) decode divides by the sum
    assert (total[cover <= 2] - 1).abs().max() < 1e-5 and (cover >= 1).all()


def test_large_and_odd_sizes(small):
    torch.manual_seed(3)
    with torch.no_grad():
        big = small.decode(torch.randn(1, 4, 128, 128))  # 1024 x 1024, tiled automatically (64 + 16 overlap)
        odd = torch.randn(2, 4, 13, 21)
        odd_tiled = small.decode(odd, tile=True, tile_size=12, tile_overlap=6)
        odd_full = small.decode(odd, tile=False)
    assert big.shape == (1, 3, 1024, 1024) and big.isfinite().all()
    assert odd_tiled.shape == odd_full.shape == (2, 3, 104, 168) and odd_tiled.isfinite().all()
    assert (odd_tiled - odd_full).abs().mean() < 0.5 * odd_full.abs().mean()  # measured 0.31 (small tiles)


def test_batch_size_chunks_equal_one_batch(small):
    latents = torch.randn(5, 4, 12, 9)
    with torch.no_grad():
        whole = small.decode(latents)
        whole_tiled = small.decode(latents, tile=True, tile_size=8, tile_overlap=2)
        chunked = small.decode(latents, batch_size=2)
        chunked_tiled = small.decode(latents, batch_size=2, tile=True, tile_size=8, tile_overlap=2)
    # not bit-identical on CPU: oneDNN picks batch-size dependent conv kernels (measured 1.5e-6 relative)
    for got, want in ((chunked, whole), (chunked_tiled, whole_tiled)):
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_float16_decoder_upcast(small):
    reference = randomised(small.config)
    half = randomised(small.config).half()
    latents = torch.randn(2, 4, 10, 12)
    with torch.no_grad():
        want = reference.decode(latents)
        half.upcast_decoder = False
        plain = half.decode(latents)
        half.upcast_decoder = True
        got = half.decode(latents)
    assert plain.dtype == torch.float16
    assert got.dtype == torch.float32 and half.decoder.conv_in.weight.dtype == torch.float32
    assert half.encoder.conv_in.weight.dtype == torch.float16  # only the decoder is upcast
    # weights were rounded to float16 once; the float32 decode of them stays within 1e-2 of the scale
    assert (got - want).abs().max() < 1e-2 * want.abs().max()
    assert (got - want).abs().max() < (plain.float() - want).abs().max()


def test_bad_arguments(small):
    with pytest.raises(ConfigError, match="latents must be"):
        small.decode(torch.randn(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="tile_overlap"):
        small.decode(torch.randn(1, 4, 8, 8), tile_size=8, tile_overlap=8)
    with pytest.raises(ConfigError, match="norm_groups"):
        VAEConfig(base_channels=24)


def test_decode_batch_follows_the_memory_budget(small):
    """decode(batch_size=None) splits the frames so each decoder call stays within ``decode_budget_bytes`` (peak
    memory flat in the frame count); the frames are those of one whole-batch call."""
    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    per_frame = 6 * small.config.base_channels * 64 * 64 * small.post_quant_conv.weight.element_size()
    calls = []
    handle = small.decoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    budget = small.decode_budget_bytes
    try:
        with torch.no_grad():
            whole = small.decode(z, batch_size=6)
            small.decode_budget_bytes = 2 * per_frame
            split = small.decode(z)
    finally:
        small.decode_budget_bytes = budget
        handle.remove()
    assert calls == [6, 2, 2, 2]
    assert torch.allclose(split, whole, atol=1e-6)
