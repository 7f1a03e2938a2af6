"""The README's SDXL example, run as written on full-size random SDXL + mm_sdxl_v10_beta files (CPU, bfloat16).

Costly (~7 GB of bfloat16 weights, a few minutes on 2 cores): it proves the real layouts load strictly into one
ModelManager and render, and that the documented example runs with only device, dtype, size and steps changed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vidsynth.cli import main as cli_main
from vidsynth.video_io import video_info

README = Path(__file__).resolve().parents[1] / "README.md"
CHANGES = {
    'torch_dtype=torch.float16, device="cuda"': 'torch_dtype=torch.bfloat16, device="cpu"',
    "height=1024, width=1024, num_frames=16, num_inference_steps=100":
        "height=128, width=128, num_frames=4, num_inference_steps=2",
}


@pytest.fixture(scope="module")
def sdxl_files(full_checkpoint):
    return (full_checkpoint("sd_xl_base_1.0.safetensors", dtype="float16"),
            full_checkpoint("mm_sdxl_v10_beta.ckpt", dtype="float16"))


def readme_example() -> str:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    for old, new in CHANGES.items():
        assert old in code, f"the README example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def test_readme_example_runs_on_full_size_files(sdxl_files, tmp_path, monkeypatch):
    base, motion = sdxl_files
    (tmp_path / "models" / "stable_diffusion_xl").mkdir(parents=True)
    (tmp_path / "models" / "AnimateDiff").mkdir(parents=True)
    (tmp_path / "models" / "stable_diffusion_xl" / "sd_xl_base_1.0.safetensors").symlink_to(base)
    (tmp_path / "models" / "AnimateDiff" / "mm_sdxl_v10_beta.ckpt").symlink_to(motion)
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})  # download_models finds the files in place
    info = video_info(tmp_path / "output_video.mp4")
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (4, 128, 128, 16)


def test_inspect_describes_sdxl_files(sdxl_files, capsys):
    base, motion = sdxl_files
    assert cli_main(["inspect", str(base), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["kind"] == "sdxl" and described["tensors"] == 2515 and described["dtype"] == "float16"
    assert set(described["components"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    unet = described["components"]["unet"]["config"]
    assert unet["transformer_depth"] == [0, 2, 10] and unet["adm_in_channels"] == 2816
    assert described["components"]["text_encoder_2"]["config"]["width"] == 1280
    assert cli_main(["inspect", str(motion)]) == 0
    text = capsys.readouterr().out
    assert "motion_module" in text and "sdxl_beta" in text
