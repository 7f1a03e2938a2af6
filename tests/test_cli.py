"""The vidsynth command on tiny single-file checkpoints written by the test."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tiny_files import write_tiny_files
from vidsynth.cli import main
from vidsynth.video_io import video_info


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    files = write_tiny_files(tmp_path_factory.mktemp("tiny_files"))
    return files["base"], files["motion"]


def test_generate_writes_a_playable_mp4(tiny_files, tmp_path, capsys):
    base, motion = tiny_files
    out = tmp_path / "clip.mp4"
    code = main(["generate", "--base", str(base), "--motion", str(motion), "--prompt", "a red fox", "--frames", "6",
                 "--steps", "2", "--size", "64x48", "--fps", "8", "--device", "cpu", "-o", str(out)])
    assert code == 0 and out.is_file()
    info = video_info(out)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (6, 64, 48, 8)
    assert str(out) in capsys.readouterr().out


def test_inspect_reports_kind_version_and_config(tiny_files, capsys):
    base, motion = tiny_files
    assert main(["inspect", str(motion), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["kind"] == "motion_module" and described["family"] == "sd15"
    assert described["components"]["motion_modules"]["config"]["version"] == "v2"
    assert main(["inspect", str(base)]) == 0
    text = capsys.readouterr().out
    assert "kind: sd15" in text and "model_channels: 32" in text and "dtype: float16" in text


def test_errors_are_one_clear_line(tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["inspect", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidsynth: error:") and "junk.ckpt" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["generate", "--base", "x", "--prompt", "p", "--size", "big", "-o", "o.mp4"])


def test_reloading_a_model_takes_its_loras_off(tiny_files, tmp_path, caplog):
    from vidsynth import ModelManager

    base, motion = tiny_files
    site = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor"
    lora = {f"{site}.to_q_lora.down.weight": torch.randn(4, 32), f"{site}.to_q_lora.up.weight": torch.randn(32, 4)}
    torch.save(lora, tmp_path / "tiny_motion_lora.ckpt")
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([base, motion, tmp_path / "tiny_motion_lora.ckpt"])
    assert [lora.name for lora in manager.loras] == ["tiny_motion_lora"]
    old = manager.motion_modules
    manager.load_model(base)  # another base: the MotionLoRA sits on the motion modules and stays
    assert len(manager.loras) == 1
    manager.load_model(motion)  # new motion modules: the LoRA's hooks would stay on the old ones
    assert manager.loras == [] and "removed LoRA tiny_motion_lora" in caplog.text
    assert manager.motion_modules is not old
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in old.modules())


def test_models_of_two_families_do_not_mix(tiny_files, tmp_path):
    from vidsynth import ModelManager
    from vidsynth.errors import ConfigError
    from vidsynth.models.unet import UNetConfig, UNetModel

    sdxl_like = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           transformer_depth=(0, 1), transformer_depth_middle=1, context_dim=64,
                           num_head_channels=16, use_linear_in_transformer=True, adm_in_channels=64)
    save_file({"model.diffusion_model." + k: v for k, v in UNetModel(sdxl_like).state_dict().items()},
              tmp_path / "sdxl_unet.safetensors")
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_model(tiny_files[0])
    with pytest.raises(ConfigError, match="new ModelManager"):
        manager.load_model(tmp_path / "sdxl_unet.safetensors")


def test_generate_from_an_input_video_or_image(tiny_files, tmp_path, capsys):
    """--input VIDEO --strength: video-to-video through the same call the library makes; the recipe keeps the input
    (hashed) and the strength; an image is animated; --strength alone is refused."""
    import numpy as np
    from PIL import Image

    from vidsynth import save_video

    base, motion = tiny_files
    rng = np.random.default_rng(0)
    source = tmp_path / "source.mp4"
    save_video(rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8), source, fps=8, quality=10)
    common = ["generate", "--base", str(base), "--motion", str(motion), "--prompt", "a red fox", "--frames", "4",
              "--steps", "5", "--size", "64x48", "--device", "cpu"]
    out = tmp_path / "restyled.mp4"
    assert main(common + ["--input", str(source), "--strength", "0.4", "-o", str(out)]) == 0
    assert video_info(out)["frames"] == 4
    assert main(["inspect", str(out)]) == 0
    assert "input: source.mp4 (strength 0.4)" in capsys.readouterr().out
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "still.png")
    assert main(common + ["--input", str(tmp_path / "still.png"), "-o", str(tmp_path / "animated.gif")]) == 0
    assert video_info(tmp_path / "animated.gif")["frames"] == 4
    assert main(common + ["--strength", "0.5", "-o", str(tmp_path / "x.mp4")]) == 2
    assert "--strength applies to --input" in capsys.readouterr().err
