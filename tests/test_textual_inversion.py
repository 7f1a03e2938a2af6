"""Textual inversion against diffusers' ``load_textual_inversion`` on tiny random models (fp32, same weights).

The prompt embeddings with the embedding's word in them are compared (SD 1.5: A1111 ``.pt``; SDXL: kohya
``clip_l``/``clip_g`` safetensors, which diffusers loads as two calls). Tolerance 1e-4 of the output scale; measured
<= 1e-6 (the same ops on both sides).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

from test_pipeline_parity import TOLERANCE, max_rel_error, scheduler  # noqa: E402
from tiny_models import tiny_sd15, tiny_sdxl  # noqa: E402
from vidsynth.errors import ConfigError  # noqa: E402

PROMPT = "a photo of badhands_v1 in the snow, " + "very detailed, " * 30  # longer than one 75-token chunk


@pytest.fixture(scope="module")
def sd15():
    tiny = tiny_sd15("v2")
    return tiny, tiny.pipeline(), tiny.diffusers_pipeline(scheduler("ddim", "v2"))


def a1111_file(path, width: int, vectors: int, seed: int = 0):
    vec = torch.randn(vectors, width, generator=torch.Generator().manual_seed(seed))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "badhands", "step": 100,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    return path


@torch.no_grad()
def test_a1111_embedding_matches_diffusers(sd15, tmp_path):
    _, ours, theirs = sd15
    path = a1111_file(tmp_path / "badhands_v1.pt", 32, 3)
    before = ours.encode_prompts(["", PROMPT], clip_skip=1, height=64, width=64).context
    assert ours.load_textual_inversion(path) == "badhands_v1"
    theirs.load_textual_inversion(str(path), token="badhands_v1")
    got = ours.encode_prompts(["", PROMPT], clip_skip=1, height=64, width=64).context
    want, negative = theirs.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    # diffusers truncates at 77 tokens; the first chunk is where the word stands
    error = max_rel_error(got[1, :77], want[0])
    print(f"A1111 embedding: {error:.1e} of the output scale")
    assert error <= TOLERANCE and max_rel_error(got[0, :77], negative[0]) <= TOLERANCE
    assert max_rel_error(before[1, :77], want[0]) > 100 * TOLERANCE  # the word was not an embedding before
    # three vectors: the prompt grew by two tokens, so the second chunk shifted too
    assert max_rel_error(before[1, 77:], got[1, 77:]) > 100 * TOLERANCE


@torch.no_grad()
def test_kohya_sdxl_embedding_matches_diffusers(tmp_path):
    tiny = tiny_sdxl()
    ours, theirs = tiny.pipeline(), tiny.diffusers_pipeline(scheduler("euler", "sdxl_beta"))
    g = torch.Generator().manual_seed(1)
    embedding = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}
    path = tmp_path / "ohwxstyle.safetensors"
    save_file(embedding, str(path))
    prompt = "a fox in ohwxstyle"
    ours.load_textual_inversion(path)
    theirs.load_textual_inversion(embedding["clip_l"], token="ohwxstyle", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(embedding["clip_g"], token="ohwxstyle", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    cond = ours.encode_prompts([prompt], clip_skip=1, height=64, width=64)
    want, _, pooled, _ = theirs.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert max_rel_error(cond.context, want) <= TOLERANCE
    assert max_rel_error(cond.y[:, :pooled.shape[-1]], pooled) <= TOLERANCE


def test_embeddings_of_the_wrong_family_are_refused(sd15, tmp_path):
    _, ours, _ = sd15
    sdxl_file = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 48)}, str(sdxl_file))
    with pytest.raises(ConfigError, match="cannot be used with SD 1.5"):
        ours.load_textual_inversion(sdxl_file)
    wide = a1111_file(tmp_path / "wide.pt", 768, 1)
    with pytest.raises(ConfigError, match="width 768 does not fit"):
        ours.load_textual_inversion(wide)
    sdxl = tiny_sdxl().pipeline()
    with pytest.raises(ConfigError, match="cannot be used with SDXL"):
        sdxl.load_textual_inversion(a1111_file(tmp_path / "sd.pt", 32, 1))


def test_prompter_loads_a_folder(tmp_path):
    pipe = tiny_sd15("v2").pipeline()
    a1111_file(tmp_path / "one.pt", 32, 1)
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "notes.txt").write_text("not an embedding")
    assert pipe.prompter.load_textual_inversions(str(tmp_path)) == ["one", "two"]
    assert len(pipe.tokenizers[0].encode("one and two")) == 1 + 1 + 2
