"""vidsynth generate --ip-adapter/--ip-image and --sparsectrl/--keyframe on tiny files written by the test."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_ip_adapter import _encoder_file, tiny_adapter_state
from tiny_files import UNET, write_tiny_files
from vidsynth.cli import main
from vidsynth.models.sparsectrl import SparseControlNet, SparseCtrlConfig
from vidsynth.models.unet import UNetModel
from vidsynth.video_io import video_info

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_conditions")
    files = write_tiny_files(root)
    torch.manual_seed(1)
    state = tiny_adapter_state(UNetModel(UNET), image_dim=24)
    torch.save(state, root / "ip-adapter_tiny.bin")
    (root / "image_encoder").mkdir()
    _encoder_file(root / "image_encoder", 24, "model.safetensors")
    sparse = SparseControlNet(SparseCtrlConfig(UNET, 3, False, (4, 16, 16, 32, 32, 96, 96, 256, 32), 32))
    torch.save({k: v.clone() for k, v in sparse.state_dict().items()}, root / "sparsectrl_scribble_tiny.ckpt")
    image = root / "prompt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    return files["base"], files["motion"], root / "ip-adapter_tiny.bin", root / "sparsectrl_scribble_tiny.ckpt", image


def test_generate_with_image_prompt_and_keyframes(files, tmp_path, capsys):
    base, motion, adapter, sparse, image = files
    common = ["generate", "--base", str(base), "--motion", str(motion), "--prompt", "a red fox", "--frames", "6",
              "--steps", "1", "--size", "64x48", "--device", "cpu"]
    out = tmp_path / "clip.mp4"
    code = main(common + ["--ip-adapter", str(adapter), "--ip-image", str(image), "--ip-scale", "0.7", "--sparsectrl",
                          str(sparse), "--keyframe", f"0:{image}", "--keyframe", f"-1:{image}", "-o", str(out)])
    assert code == 0 and video_info(out)["frames"] == 6
    conditioned, plain = tmp_path / "conditioned", tmp_path / "plain"  # PNG frames: lossless, comparable
    assert main(common + ["--ip-adapter", str(adapter), "--ip-image", str(image), "-o", str(conditioned)]) == 0
    assert main(common + ["-o", str(plain)]) == 0
    first = lambda folder: np.asarray(Image.open(sorted(folder.glob("*.png"))[0]))  # noqa: E731
    assert not np.array_equal(first(conditioned), first(plain))  # the image prompt reached the frames


def test_keyframe_outside_the_video_is_one_clear_error(files, tmp_path, capsys):
    base, motion, _, sparse, image = files
    code = main(["generate", "--base", str(base), "--motion", str(motion), "--prompt", "a red fox", "--frames", "6",
                 "--steps", "1", "--size", "64x48", "--device", "cpu", "--sparsectrl", str(sparse), "--keyframe",
                 f"6:{image}", "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "outside the 6-frame video" in err and not (tmp_path / "x.mp4").exists()
