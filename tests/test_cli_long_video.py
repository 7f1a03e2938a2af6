"""--free-noise / --free-init / --motion-scale: the command renders what the library call with the same options
renders, keeps the options in the recipe (so --recipe renders the same frames again) and refuses bad options before
it loads anything."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_files import write_tiny_files
from vidsynth.cli import main, parse_motion_scale, parse_options
from vidsynth.errors import ConfigError
from vidsynth.render import read_recipe
from vidsynth.video_io import load_video

pytestmark = pytest.mark.usefixtures("one_thread")

FREE_NOISE = "context_length=8,context_stride=4,weighting_scheme=flat"
FREE_INIT = "num_iters=2,method=gaussian,use_fast_sampling=false"


def frames_of(path) -> list[np.ndarray]:
    return [np.asarray(frame) for frame in load_video(path)]


def test_option_parsers():
    assert parse_options("--free-noise", "") == {}
    assert parse_options("--free-init", "num_iters=2, method=ideal,order=4.5") == {
        "num_iters": 2, "method": "ideal", "order": 4.5}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options("--free-init", "gaussian")
    assert parse_motion_scale([]) is None
    assert parse_motion_scale(["1.25"]) == 1.25
    assert parse_motion_scale(["8:1.3", "0:1"]) == {0: 1.0, 8: 1.3}
    for bad in (["fast"], ["0:1", "1.2"], ["a:1"]):
        with pytest.raises(ConfigError, match="--motion-scale"):
            parse_motion_scale(bad)


def test_cli_matches_the_library_call_and_the_recipe_renders_again(tmp_path):
    from vidsynth import ModelManager, SDVideoPipeline

    tiny = write_tiny_files(tmp_path / "models")
    common = ["generate", "--base", str(tiny["base"]), "--motion", str(tiny["motion"]), "--prompt", "a red fox",
              "--size", "32x32", "--frames", "12", "--steps", "2", "--seed", "3", "--device", "cpu",
              "--dtype", "float32"]
    long = common + ["--free-noise", FREE_NOISE, "--free-init", FREE_INIT,
                     "--motion-scale", "0:1.0", "--motion-scale", "11:1.4"]
    assert main(long + ["-o", f"{tmp_path}/long/"]) == 0
    recipe = read_recipe(tmp_path / "long")
    assert recipe.free_noise == {"context_length": 8, "context_stride": 4, "weighting_scheme": "flat"}
    assert recipe.free_init == {"num_iters": 2, "method": "gaussian", "use_fast_sampling": False}
    assert recipe.motion_scale == {0: 1.0, 11: 1.4}

    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([tiny["base"], tiny["motion"]])
    pipe = SDVideoPipeline.from_model_manager(manager)
    library = pipe(prompt="a red fox", negative_prompt="", num_frames=12, height=32, width=32, seed=3,
                   num_inference_steps=2, sampler=recipe.sampler, cfg_scale=recipe.cfg_scale, progress_bar=False,
                   free_noise=recipe.free_noise, free_init=recipe.free_init, motion_scale={0: 1.0, 11: 1.4})
    cli = frames_of(tmp_path / "long")
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(cli, library)) and len(cli) == 12

    assert main(common + ["-o", f"{tmp_path}/plain/"]) == 0  # without the options: other frames
    plain = frames_of(tmp_path / "plain")
    assert np.abs(np.stack(plain).astype(int) - np.stack(cli)).mean() > 1

    assert main(["generate", "--recipe", str(tmp_path / "long"), "--device", "cpu", "--dtype", "float32",
                 "-o", f"{tmp_path}/again/"]) == 0
    assert all(np.array_equal(a, b) for a, b in zip(frames_of(tmp_path / "again"), cli))


@pytest.mark.parametrize("flag, value, words", [("--free-init", "method=sharp", "free_init method must be one of"),
                                                ("--free-noise", "noise_type=pink", "noise_type must be one of"),
                                                ("--free-noise", "stride=2", "unknown option(s) stride")])
def test_bad_options_refused_before_loading(tmp_path, capsys, flag, value, words):
    # the base file does not exist: the option's error comes first, so nothing was looked up or loaded
    code = main(["generate", "--base", str(tmp_path / "absent.safetensors"), "--prompt", "a fox", flag, value,
                 "-o", str(tmp_path / "x.mp4")])
    assert code == 2
    assert words in capsys.readouterr().err
