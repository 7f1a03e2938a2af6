"""CLIPTokenizer: ids identical to transformers.CLIPTokenizer on the verified CLIP files; web-UI chunking."""
from __future__ import annotations

from importlib import resources

import pytest
import torch

from vidsynth.errors import ConfigError
from vidsynth.tokenizer import CLIPTokenizer

BOS, EOS = 49406, 49407
FOX = "a beautiful highly detailed photograph of a red fox sitting in a snowy forest at golden hour"
LONG = ", ".join([FOX] * 5)  # 89 tokens: the README's long prompt

PROMPTS = [
    "a photo of a cat",
    "A Photo of an ASTRONAUT, riding a horse on Mars!!",
    "masterpiece, best quality, 1girl, (smiling:1.2)",
    "(masterpiece:1.3), [blurry], {detailed}, ((best quality))",
    "Café naïve résumé façade Ångström",
    "cafe\u0301 (decomposed accent, NFC must compose it)",
    "東京タワー 夜景, 京都の桜",
    "한국어 프롬프트 and Русский текст",
    "emoji 🐱🚀✨ and 👩‍👩‍👧 family, 🇯🇵 flag",
    "numbers 1234567890 3.14159 1e-5 0x1F 2024-01-01",
    "don't can't we're I've I'm you'll she'd it's",
    "DON'T SHOUT, It'S LoUd",
    "tabs\tand\nnewlines\r\n  and    runs   of   spaces",
    "   leading and trailing whitespace   ",
    "",
    "   ",
    "punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ~~~ ``` ||| \\\\ ///",
    "quotes \"double\" 'single' «guillemets» „low“ ‘curly’",
    "html &amp; entities &lt;b&gt; kept as text",
    "math ∑∫√∞≠≈ ± × ÷ ° µ",
    "a <|endoftext|> inside and <|startoftext|> too",
    "<lora:animeStyle_v2:0.8> embedding:easynegative",
    "Greek αβγ ΔΕΖ, Hebrew שלום, Arabic مرحبا, Thai สวัสดี, Hindi नमस्ते",
    "ﬁ ligature, full-width ＡＢＣ１２３, superscript x² H₂O",
    "mixedCASEwordsWithoutSpaces and snake_case_words and kebab-case-words",
    "url https://example.com/path?query=1&b=2#frag",
    "zero\u200bwidth\u00a0nbsp\u2003emspace",
    "a photograph of an astronaut riding a horse, " * 4,
    LONG,
    " ".join(f"word{i}" for i in range(120)),
    "🐱" * 40,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference(shared_dir):
    transformers = pytest.importorskip("transformers")
    folder = shared_dir / "clip-tokenizer"
    if not (folder / "vocab.json").is_file():
        pytest.skip(f"{folder} (the verified CLIP vocab/merges) is absent")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt"])
def test_package_data_is_the_verified_files(shared_dir, name):
    verified = shared_dir / "clip-tokenizer" / name
    if not verified.is_file():
        pytest.skip(f"{verified} is absent")
    assert (resources.files("vidsynth") / "data" / name).read_bytes() == verified.read_bytes()


def test_ids_match_transformers(tok, reference):
    assert len(PROMPTS) >= 30
    for text in PROMPTS:
        assert tok.encode(text) == reference(text, add_special_tokens=False).input_ids, text
    assert max(len(tok.encode(t)) for t in PROMPTS) > 77  # long prompts are not truncated


def test_verified_examples(tok):
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("A Photo of an ASTRONAUT, riding a horse on Mars!!") == [
        320, 1125, 539, 550, 18376, 267, 6765, 320, 4558, 525, 7496, 748]
    assert tok.encode("masterpiece, best quality, 1girl, (smiling:1.2)") == [
        12066, 267, 949, 3027, 267, 272, 1611, 267, 263, 9200, 281, 272, 269, 273, 264]
    ids = tok.encode(LONG)
    assert len(ids) == 89
    assert ids[:19] == [320, 1215, 5302, 12609, 8853, 539, 320, 736, 3240, 4919, 530, 320, 14191, 4167, 536, 3878,
                        2232, 267, 320]
    assert ids[-4:] == [4167, 536, 3878, 2232]


def test_short_prompt_is_one_padded_chunk(tok):
    out = tok.chunks(["a photo of a cat"])
    assert out.dtype == torch.long and out.shape == (1, 1, 77)
    assert out[0, 0].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS] + [EOS] * 70


def test_long_prompt_splits_into_wrapped_chunks(tok):
    ids = tok.encode(LONG)
    out = tok.chunks([LONG])
    assert out.shape == (1, 2, 77)
    first, second = out[0].tolist()
    assert first == [BOS] + ids[:75] + [EOS]
    assert second == [BOS] + ids[75:] + [EOS] + [EOS] * (75 - 14)


def test_pad_id_zero_for_openclip(tok):
    out = CLIPTokenizer(pad_id=0).chunks(["a photo of a cat", LONG])
    assert out.shape == (2, 2, 77)
    assert out[0, 0].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS] + [0] * 70
    assert out[0, 1].tolist() == [BOS, EOS] + [0] * 75
    assert out[1, 1, 15:].tolist() == [EOS] + [0] * 61
    ref = tok.chunks(["a photo of a cat", LONG])
    padding = (ref == EOS).int().cumsum(-1) > 1  # everything after the first eos
    assert (out[padding] == 0).all() and torch.equal(out[~padding], ref[~padding])
    assert (out.argmax(-1) == (out == EOS).int().argmax(-1)).all()  # pooling at argmax finds the eos


def test_min_chunks_and_mixed_batch(tok):
    texts = ["a photo of a cat", LONG, "", " ".join(["cat"] * 160)]
    lengths = [len(tok.encode(t)) for t in texts]
    assert lengths[3] == 160  # 3 chunks: 75 + 75 + 10
    out = tok.chunks(texts)
    assert out.shape == (4, 3, 77)
    assert (out[..., 0] == BOS).all()
    for row, ids in zip(out, (tok.encode(t) for t in texts)):
        body = [i for chunk in row.tolist() for i in chunk[1:chunk.index(EOS)]]
        assert body == ids  # nothing lost, nothing truncated
        for chunk in row.tolist():
            end = chunk.index(EOS)
            assert chunk[0] == BOS and BOS not in chunk[1:] and set(chunk[end:]) == {EOS}
    assert out[2].tolist() == [[BOS, EOS] + [EOS] * 75] * 3  # the empty (negative) prompt: empty chunks
    assert tok.chunks(["a cat"], min_chunks=3).shape == (1, 3, 77)
    assert tok.chunks(texts, min_chunks=2).shape == (4, 3, 77)  # min_chunks is a floor, not a cap
    assert tok.chunks([]).shape == (0, 1, 77)


def test_user_errors(tok):
    with pytest.raises(ConfigError, match="list of prompts"):
        tok.chunks("a cat")
    with pytest.raises(ConfigError, match="max_length"):
        CLIPTokenizer(max_length=2)
