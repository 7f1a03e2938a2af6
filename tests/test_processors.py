"""ControlNet preprocessors: the lineart annotator network against a functional transcription of the original
generator, Canny against OpenCV called directly, pass-through ids, the full-size sk_model.pth, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tiny_models import randomise
from vidsynth.errors import ConfigError
from vidsynth.models.lineart import LineartConfig, LineartGenerator
from vidsynth.processors import Processor, detect_size

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = LineartConfig(width=8, residual_blocks=2)


def reference_generator(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The informative-drawings generator as plain functional ops (ControlNet 1.1 annotator/lineart Generator:
    reflect pad 3 + conv7, two stride-2 convs, residual blocks, two transposed convs, reflect pad 3 + conv7,
    sigmoid; InstanceNorm + ReLU in between)."""
    def block(h, name, pad=0, stride=1, relu=True):
        h = F.pad(h, (pad,) * 4, mode="reflect") if pad else h
        h = F.conv2d(h, state[f"{name}.weight"], state[f"{name}.bias"], stride=stride, padding=0 if pad else 1)
        h = F.instance_norm(h)
        return F.relu(h) if relu else h

    h = block(x, "model0.1", pad=3)
    h = block(block(h, "model1.0", stride=2), "model1.3", stride=2)
    for i in range(TINY.residual_blocks):
        r = block(h, f"model2.{i}.conv_block.1", pad=1)
        h = h + block(r, f"model2.{i}.conv_block.5", pad=1, relu=False)
    for name in ("model3.0", "model3.3"):
        h = F.relu(F.instance_norm(F.conv_transpose2d(h, state[f"{name}.weight"], state[f"{name}.bias"], stride=2,
                                                      padding=1, output_padding=1)))
    h = F.conv2d(F.pad(h, (3,) * 4, mode="reflect"), state["model4.1.weight"], state["model4.1.bias"])
    return torch.sigmoid(h)


def tiny_annotator_dir(tmp_path):
    model = randomise(lambda: LineartGenerator(TINY), seed=0)
    torch.save(model.state_dict(), tmp_path / "sk_model.pth")
    return model, tmp_path


def frame(w: int = 80, h: int = 72, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    grid = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(grid).resize((w, h), Image.NEAREST)  # blocks: edges for Canny, structure for lineart


def test_lineart_network_matches_the_functional_original(tmp_path):
    """Measured max difference 0 (float32, CPU) between the module and the functional transcription; config read
    off shapes."""
    model, _ = tiny_annotator_dir(tmp_path)
    state = model.state_dict()
    assert LineartConfig.from_state_dict({k: v.shape for k, v in state.items()}) == TINY
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        assert (model(x) - reference_generator(state, x)).abs().max() < 1e-5


def test_lineart_processor_runs_the_file_and_inverts(tmp_path):
    """Processor("lineart") = 255 - 255 * network(frame / 255) at the detect size (64-multiples), back to the frame
    size; white lines on black as controlnet_aux's LineartDetector returns."""
    model, folder = tiny_annotator_dir(tmp_path)
    image = frame(128, 64)
    out = Processor("lineart", folder)(image)
    assert out.size == image.size and out.mode == "RGB"
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = 255 - (model(x)[0, 0] * 255).to(torch.uint8).numpy()
    assert np.abs(np.asarray(out)[..., 0].astype(int) - expected).max() <= 1


def test_full_size_sk_model_loads_strictly(full_checkpoint, tmp_path):
    """The full-size random sk_model.pth from the layout (24 tensors) loads strictly and runs."""
    path = full_checkpoint("sk_model.pth")
    processor = Processor("lineart", path)
    assert processor.model.config == LineartConfig(3, 1, 64, 3)
    assert processor(frame(64, 64)).size == (64, 64)


def test_canny_is_opencv_canny():
    cv2 = pytest.importorskip("cv2")
    image = frame(128, 64)  # already at 64-multiples: no resize before detection
    expected = cv2.Canny(np.asarray(image), 100, 200)
    out = np.asarray(Processor("canny")(image))
    assert expected.any() and np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)


def test_pass_through_ids_and_detect_size():
    image = frame()
    for pid in ("none", "tile", "inpaint"):
        assert np.array_equal(np.asarray(Processor(pid)(image)), np.asarray(image))
    assert detect_size(80, 72, 72) == (64, 64) and detect_size(640, 360, 512) == (896, 512)


def test_other_ids_say_what_they_need(tmp_path):
    with pytest.raises(ConfigError, match=r'dpt_hybrid.*processor_id="none"'):
        Processor("depth")
    with pytest.raises(ConfigError, match="unknown processor_id 'sobel'"):
        Processor("sobel")
    with pytest.raises(ConfigError, match=r"sk_model\.pth"):
        Processor("lineart", tmp_path)


def test_canny_without_opencv_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "cv2", None)
    with pytest.raises(ConfigError, match=r"vidsynth\[control\]"):
        Processor("canny")
