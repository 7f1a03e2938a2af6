"""Outputs carry their recipe: written into every output format, read back by `vidsynth inspect`, rendered again by
`vidsynth generate --recipe`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tiny_files import write_tiny_files
from vidsynth.cli import main
from vidsynth.errors import VidsynthError
from vidsynth.recipe import ModelRef, Recipe, file_sha256
from vidsynth.render import read_recipe, save
from vidsynth.video_io import load_video, read_comment, save_video

SMALL = ["--size", "32x32", "--frames", "2", "--steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("tiny"))


def a_recipe(tiny) -> Recipe:
    return Recipe(prompt="a fox in the snow, ünïcode ✓ \"quoted\"", negative_prompt="blurry", seed=2**64 - 1,
                  sampler="euler_a", steps=3, cfg_scale=6.5, width=32, height=32, frames=3, fps=8,
                  base=ModelRef.of(tiny["base"]), motion=ModelRef.of(tiny["motion"]),
                  loras=(ModelRef.of(tiny["motion_lora"], 0.7),), sampler_options={"karras": True},
                  vidsynth_version="0.1.0").hashed()


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "clip.gif", "clip.webp", "frames/"])
def test_recipe_round_trips_through_every_format(tiny, tmp_path, name, capsys):
    recipe = a_recipe(tiny)
    frames = [Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)) for i in range(3)]
    out = save(frames, tmp_path / name, recipe)
    assert read_recipe(out) == recipe
    assert recipe.base.sha256 == file_sha256(tiny["base"]) and len(recipe.base.sha256) == 64
    assert len(load_video(out)) == 3  # still a normal video
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("ünïcode ✓", "seed: 18446744073709551615", "sampler: euler_a", "steps: 3", "cfg: 6.5",
                     "size: 32x32", "frames: 3", "tiny_sd15.safetensors", recipe.base.sha256,
                     "tiny_motion_lora.ckpt (weight 0.7)", "vidsynth: 0.1.0"):
        assert expected in text, expected
    assert main(["inspect", str(out), "--json"]) == 0
    assert Recipe.from_dict(json.loads(capsys.readouterr().out)) == recipe


def test_a_video_without_recipe_says_so(tmp_path, capsys):
    out = save_video([Image.new("RGB", (16, 16))] * 2, tmp_path / "plain.gif")
    assert read_comment(out) is None
    with pytest.raises(VidsynthError, match="holds no vidsynth recipe"):
        read_recipe(out)
    assert main(["inspect", str(out)]) == 2 and "no vidsynth recipe" in capsys.readouterr().err


def test_generate_records_the_recipe_and_renders_it_again(tiny, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["generate", "--base", str(tiny["base"]), "--motion", str(tiny["motion"]), "--lora",
                 f"{tiny['motion_lora']}:0.5", "--prompt", "a red fox", "--negative", "ugly", "--seed", "7",
                 "-o", f"{first}/", *SMALL]) == 0
    recipe = read_recipe(first)
    # the defaults the motion module chose are written down, not left empty
    assert (recipe.sampler, recipe.cfg_scale, recipe.steps, recipe.seed) == ("ddim", 7.5, 1, 7)
    assert [(lora.name, lora.alpha) for lora in recipe.loras] == [("tiny_motion_lora.ckpt", 0.5)]
    again = tmp_path / "again"
    assert main(["generate", "--recipe", str(first), "-o", f"{again}/", "--device", "cpu"]) == 0
    assert read_recipe(again) == recipe
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(load_video(first), load_video(again)))
    # options given on top of a recipe override it
    other = tmp_path / "other"
    assert main(["generate", "--recipe", str(first), "--seed", "8", "-o", f"{other}/", "--device", "cpu"]) == 0
    assert read_recipe(other).seed == 8
    assert not np.array_equal(np.asarray(load_video(first)[0]), np.asarray(load_video(other)[0]))
