"""Text encoders: fp32 parity with transformers on tiny random models; configs and key sets of the real files."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vidsynth.errors import CheckpointError, ConfigError
from vidsynth.models.text import (CLIPTextModel, OpenCLIPTextModel, TextEncoderConfig, build_text_encoder,
                                  encode_chunks)

transformers = pytest.importorskip("transformers")

BOS, EOS, VOCAB = 49406, 49407, 49408
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


def tiny(activation: str, projection: int | None, layout: str) -> TextEncoderConfig:
    return TextEncoderConfig(VOCAB, width=64, layers=3, heads=4, max_positions=77, activation=activation,
                             projection_dim=projection, layout=layout)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random, LayerNorm weights around 1, so a swapped or skipped norm shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(1.0)
    return model.eval()


def prompt_ids(pad: int) -> torch.Tensor:
    """Three rows bos, random tokens, eos at 6 / 41 / 76, then ``pad``."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((3, 77), pad, dtype=torch.long)
    for row, eos_at in enumerate((6, 41, 76)):
        ids[row, 0] = BOS
        ids[row, 1:eos_at] = torch.randint(0, BOS, (eos_at - 1,), generator=g)
        ids[row, eos_at] = EOS
    return ids


def hf_config(activation: str, projection: int | None):
    return transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                       num_attention_heads=4, max_position_embeddings=77, hidden_act=activation,
                                       projection_dim=projection or 64, bos_token_id=BOS, eos_token_id=EOS)


def load_into(reference: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    if isinstance(reference, transformers.CLIPTextModel):  # transformers 5 dropped the files' "text_model." level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not missing
    assert {k.removeprefix("text_model.") for k in unexpected} <= {"embeddings.position_ids"}  # not persistent there
    for module in reference.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"  # an independent oracle for our SDPA path
    return reference.eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # fp32; tolerance 1e-4 of the output scale (measured max error ~1e-6 of it)
    scale = ref.abs().max().item()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, scale)


@torch.no_grad()
@pytest.mark.parametrize("projection", [None, 32])  # 32: the HF layout of diffusers' text_encoder_2
def test_clip_l_layout_matches_transformers(projection):
    ours = randomise(CLIPTextModel(tiny("quick_gelu", projection, "hf")))
    hf_class = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    ref = load_into(hf_class(hf_config("quick_gelu", projection)), ours.state_dict())
    ids = prompt_ids(pad=EOS)
    out = ref(input_ids=ids, output_hidden_states=True)

    hidden, pooled = ours(ids)  # SD 1.5, clip skip 1
    assert_close(hidden, out.last_hidden_state)
    assert_close(pooled, out.text_embeds if projection else out.pooler_output)
    hidden, pooled2 = ours(ids, hidden_layer=-2, final_norm=False)  # SDXL's first encoder
    assert_close(hidden, out.hidden_states[-2])
    assert torch.equal(pooled, pooled2)  # pooled always comes from the last layer
    hidden, _ = ours(ids, hidden_layer=-2)  # SD 1.5, clip skip 2
    final_layer_norm = ref.text_model.final_layer_norm if projection else ref.final_layer_norm
    assert_close(hidden, final_layer_norm(out.hidden_states[-2]))
    assert TextEncoderConfig.from_state_dict(ours.state_dict()).projection_dim == projection


def open_clip_to_hf(state: dict[str, torch.Tensor], reference: nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    return convert_open_clip_checkpoint(reference, {OPEN_CLIP_PREFIX + k: v for k, v in state.items()},
                                        prefix=OPEN_CLIP_PREFIX)


@torch.no_grad()
def test_open_clip_layout_matches_transformers_with_projection():
    ours = randomise(OpenCLIPTextModel(tiny("gelu", 48, "open_clip")))  # 48 != width: a missed transpose fails
    ref = transformers.CLIPTextModelWithProjection(hf_config("gelu", 48))
    ref = load_into(ref, open_clip_to_hf(ours.state_dict(), ref))
    ids = prompt_ids(pad=0)
    out = ref(input_ids=ids, output_hidden_states=True)

    hidden, pooled = ours(ids, hidden_layer=-2, final_norm=False)  # SDXL's bigG
    assert pooled.shape == (3, 48)
    assert_close(hidden, out.hidden_states[-2])
    assert_close(pooled, out.text_embeds)
    hidden, _ = ours(ids)
    assert_close(hidden, out.last_hidden_state)


@torch.no_grad()
def test_encode_chunks_concatenates_and_pools_first_chunk():
    model = randomise(CLIPTextModel(tiny("quick_gelu", None, "hf")))
    ids = prompt_ids(pad=EOS)[[0, 1, 2, 1]].reshape(2, 2, 77)  # 2 texts x 2 chunks
    hidden, pooled = encode_chunks(model, ids, hidden_layer=-2, final_norm=False)
    assert hidden.shape == (2, 2 * 77, 64) and pooled.shape == (2, 64)
    for text in range(2):
        alone, alone_pooled = model(ids[text], hidden_layer=-2, final_norm=False)
        torch.testing.assert_close(hidden[text], alone.reshape(2 * 77, 64))
        torch.testing.assert_close(pooled[text], alone_pooled[0])


def test_user_errors():
    model = CLIPTextModel(tiny("quick_gelu", None, "hf"))
    ids = prompt_ids(pad=EOS)
    for bad in (-4, 3):
        with pytest.raises(ConfigError, match="hidden_layer"):
            model(ids, hidden_layer=bad)
    with pytest.raises(ConfigError, match="chunks"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(CheckpointError, match="not a CLIP text encoder"):
        TextEncoderConfig.from_state_dict({"model.diffusion_model.out.0.weight": [320]})
    with pytest.raises(CheckpointError, match="lack"):
        TextEncoderConfig.from_state_dict({"token_embedding.weight": [49408, 64]})


# ---- the real files' layouts ---------------------------------------------------------------------------------------

REAL = {  # manifest, prefix -> (width, layers, heads, activation, projection, layout)
    ("v1-5-pruned-emaonly.safetensors", "cond_stage_model.transformer."): (768, 12, 12, "quick_gelu", None, "hf"),
    ("sd_xl_base_1.0.safetensors", "conditioner.embedders.0.transformer."): (768, 12, 12, "quick_gelu", None, "hf"),
    ("sd_xl_base_1.0.safetensors", "conditioner.embedders.1.model."): (1280, 32, 20, "gelu", 1280, "open_clip"),
}


@pytest.mark.parametrize(("manifest", "prefix"), list(REAL))
def test_real_layout_config_and_keys(shared_dir, manifest, prefix):
    data = json.loads((shared_dir / "checkpoint-layouts" / f"{manifest}.json").read_text())
    shapes = {k[len(prefix):]: v for k, v in data["tensors"].items() if k.startswith(prefix)}
    dtypes = {k[len(prefix):]: v for k, v in data.get("dtype_overrides", {}).items() if k.startswith(prefix)}
    width, layers, heads, activation, projection, layout = REAL[manifest, prefix]

    config = TextEncoderConfig.from_state_dict(shapes)
    assert config == TextEncoderConfig(49408, width, layers, heads, 77, activation, projection, layout, 4 * width)
    with torch.device("meta"):
        model = build_text_encoder(shapes)
    assert isinstance(model, CLIPTextModel if layout == "hf" else OpenCLIPTextModel)
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == shapes
    assert {k: str(v.dtype).removeprefix("torch.") for k, v in state.items() if not v.is_floating_point()} == dtypes
