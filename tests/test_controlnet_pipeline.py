"""ControlNet in the video pipeline: end-to-end parity with diffusers' AnimateDiffControlNetPipeline on tiny models
(one unit; two units with scales and guidance spans), DiffSynth's surface, and the checks before compute.

The diffusers twin is patched to the original AnimateDiff (per-frame motion-module GroupNorm, tests/tiny_models.py
motion_unet). Size as tests/test_pipeline_parity.py: 64x128 pixels, 4 frames, 3 DDIM steps, CFG 7.5, same noise.
Measured: latents <= 2.1e-6 of their scale, frames <= 2.9e-6 (tolerance 1e-4); the control moves the latents by
0.23-0.28 of their scale.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

from test_controlnet import sd15_pair  # noqa: E402
from test_pipeline_parity import CFG, FRAMES, HEIGHT, PROMPT, STEPS, WIDTH, noise, scheduler  # noqa: E402
from tiny_models import (diffusers_vae, motion_unet, tiny_sd15, transformers_text_encoder,  # noqa: E402
                         transformers_tokenizer)

from vidsynth import ControlNetConfigUnit  # noqa: E402
from vidsynth.errors import ConfigError  # noqa: E402
from vidsynth.pipelines.controlnet import ControlNetUnit, load_units  # noqa: E402
from vidsynth.processors import Processor  # noqa: E402

TOLERANCE = 1e-4


def control_frames(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((HEIGHT // 8, WIDTH // 8, 3)) * 255).astype(np.uint8)).resize(
        (WIDTH, HEIGHT), Image.NEAREST) for _ in range(FRAMES)]


@pytest.fixture(scope="module")
def setup():
    tiny = tiny_sd15("v2")
    nets = [sd15_pair(seed) for seed in (0, 1)]
    ours = [ControlNetUnit(net, Processor("none"), 1.0, None, f"tiny{i}") for i, (net, _, _) in enumerate(nets)]
    pipe = tiny.pipeline()
    unet, adapter = motion_unet(tiny.unet, tiny.motion)
    twin = diffusers.AnimateDiffControlNetPipeline(
        vae=diffusers_vae(tiny.vae), text_encoder=transformers_text_encoder(tiny.text_encoders[0]),
        tokenizer=transformers_tokenizer(), unet=unet, motion_adapter=adapter,
        controlnet=diffusers.MultiControlNetModel([twin for _, twin, _ in nets]), scheduler=scheduler("ddim", "v2"))
    twin.set_progress_bar_config(disable=True)
    return pipe, ours, twin, nets


def run_diffusers(twin, nets, frames, **kwargs):
    twin.controlnet = diffusers.MultiControlNetModel([nets[i][1] for i in range(len(frames))])
    final = {}

    def keep(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    out = twin(PROMPT, negative_prompt="", guidance_scale=CFG, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
               num_inference_steps=STEPS, output_type="np", latents=noise(), conditioning_frames=frames,
               callback_on_step_end=keep, **kwargs).frames[0]
    return final["latents"], out


def run_ours(pipe, units, frames, output_type, **kwargs):
    pipe.controlnets = units
    return pipe(PROMPT, negative_prompt="", cfg_scale=CFG, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                num_inference_steps=STEPS, latents=noise(), output_type=output_type, progress_bar=False,
                controlnet_frames=frames, **kwargs)


def relative(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).float(), torch.as_tensor(np.asarray(b)).float()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", ["one", "two"])
def test_matches_animatediff_controlnet_pipeline(setup, case):
    """one: a single unit at scale 1; two: two units (one frame list each), conditioning scales 0.7 / 1.3, the
    second only over steps 1-2 of 3 (control_guidance_start=0.3); the control visibly changes the result."""
    pipe, units, twin, nets = setup
    if case == "one":
        frames, kwargs, ours_units = [control_frames(0)], {}, units[:1]
        ours_frames = frames[0]
    else:
        frames = [control_frames(0), control_frames(1)]
        kwargs = dict(controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.3],
                      control_guidance_end=[1.0, 1.0])
        ours_units, ours_frames = units, frames
    ref_latents, ref_frames = run_diffusers(twin, nets, frames, **kwargs)
    latents = run_ours(pipe, ours_units, ours_frames, "latent", **kwargs)
    video = run_ours(pipe, ours_units, ours_frames, "np", **kwargs)
    assert relative(latents, ref_latents) < TOLERANCE
    assert relative(video, ref_frames) < TOLERANCE
    pipe.controlnets = []
    plain = pipe(PROMPT, negative_prompt="", cfg_scale=CFG, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                 num_inference_steps=STEPS, latents=noise(), output_type="latent", progress_bar=False)
    assert relative(latents, plain) > 1e-2


def test_checks_before_compute(setup, caplog):
    pipe, units, _, _ = setup
    pipe.controlnets = units[:1]
    call = dict(prompt=PROMPT, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                progress_bar=False, output_type="latent")
    with pytest.raises(ConfigError, match="needs controlnet_frames"):
        pipe(**call)
    with pytest.raises(ConfigError, match=r"controlnet_frames has 3 frames but num_frames=4"):
        pipe(**call, controlnet_frames=control_frames(0)[:3])
    with pytest.raises(ConfigError, match="2 lists of frames for 1 ControlNet"):
        pipe(**call, controlnet_frames=[control_frames(0), control_frames(1)])
    with pytest.raises(ConfigError, match="control_guidance_start/end"):
        pipe(**call, controlnet_frames=control_frames(0), control_guidance_start=0.8, control_guidance_end=0.2)
    small = [f.resize((WIDTH // 2, HEIGHT // 2)) for f in control_frames(0)]
    with caplog.at_level(logging.WARNING):
        out = pipe(**call, controlnet_frames=small)
    assert out.shape == noise().shape and "controlnet_frames are 64x32; resized to 128x64" in caplog.text
    pipe.controlnets = []
    with pytest.raises(ConfigError, match="has no ControlNet"):
        pipe(**call, controlnet_frames=control_frames(0))


class _Manager:
    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def fetch_controlnet(self, path):
        return self.model


def test_units_check_family_and_union_control_type():
    from test_controlnet import union_pair

    sd15, _, _ = sd15_pair()
    with pytest.raises(ConfigError, match=r"cn_sd15\.pth: a sd15 ControlNet cannot control this sdxl pipeline"):
        load_units(_Manager(sd15), [ControlNetConfigUnit("none", "cn_sd15.pth")], "sdxl")
    union, _ = union_pair()
    with pytest.raises(ConfigError, match="union ControlNet: say which control type"):
        load_units(_Manager(union), [ControlNetConfigUnit("none", "promax.safetensors")], "sdxl")
    [unit] = load_units(_Manager(union), [ControlNetConfigUnit("canny", "promax.safetensors", 0.5)], "sdxl")
    assert unit.control_type == 3 and unit.scale == 0.5
    [unit] = load_units(_Manager(union), [ControlNetConfigUnit("none", "promax.safetensors", control_type="tile")],
                        "sdxl")
    assert unit.control_type == 6


def test_sdxl_union_unit_drives_the_sdxl_pipeline():
    """No diffusers AnimateDiff SDXL ControlNet pipeline exists to compare with: the union unit (parity of the
    model itself in test_controlnet.py) changes the result, and at conditioning scale 0 it is exactly the plain run
    (the provider is skipped, not multiplied by 0)."""
    from test_controlnet import union_pair
    from tiny_models import tiny_sdxl

    pipe = tiny_sdxl().pipeline()
    union, _ = union_pair()
    call = dict(prompt=PROMPT, negative_prompt="", cfg_scale=CFG, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                num_inference_steps=2, latents=noise(), output_type="latent", progress_bar=False)
    plain = pipe(**call)
    pipe.controlnets = [ControlNetUnit(union, Processor("none"), 1.0, 3, "union")]
    controlled = pipe(**call, controlnet_frames=control_frames(0))
    off = pipe(**call, controlnet_frames=control_frames(0), controlnet_conditioning_scale=0.0)
    assert relative(controlled, plain) > 1e-2 and torch.equal(off, plain)


@pytest.fixture(scope="module")
def files_on_disk(tmp_path_factory):
    """Tiny SD 1.5 base + v2 motion module (tests/tiny_files.py), a tiny cldm ControlNet for that UNet, and the
    annotator at DiffSynth's default place, models/Annotators/sk_model.pth, under one folder."""
    from test_processors import TINY
    from tiny_files import write_tiny_controlnet, write_tiny_files
    from tiny_models import randomise

    from vidsynth.models.lineart import LineartGenerator

    root = tmp_path_factory.mktemp("controlnet_files")
    files = write_tiny_files(root)
    files["controlnet"] = write_tiny_controlnet(root / "control_tiny_sd15_lineart.pth")
    (root / "models" / "Annotators").mkdir(parents=True)
    torch.save(randomise(lambda: LineartGenerator(TINY), seed=8).state_dict(),
               root / "models" / "Annotators" / "sk_model.pth")
    return root, files


def test_diffsynth_surface(files_on_disk, monkeypatch):
    """DiffSynth's program shape: load_models with the ControlNet file, from_model_manager with two units (lineart
    from models/Annotators, tile), one list of frames for both; frames come back at the size asked for."""
    from vidsynth import ControlNetConfigUnit, ModelManager, SDVideoPipeline

    root, files = files_on_disk
    monkeypatch.chdir(root)
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([files["base"], files["motion"], files["controlnet"]])
    pipe = SDVideoPipeline.from_model_manager(manager, controlnet_config_units=[
        ControlNetConfigUnit("lineart", files["controlnet"], 0.5),
        ControlNetConfigUnit("tile", files["controlnet"], 0.5)])
    assert [u.processor.processor_id for u in pipe.controlnets] == ["lineart", "tile"]
    frames = [f.resize((64, 64)) for f in control_frames(0)[:2]]
    video = pipe("a fox", num_frames=2, height=64, width=64, num_inference_steps=1, controlnet_frames=frames,
                 progress_bar=False)
    assert len(video) == 2 and video[0].size == (64, 64)


def test_cli_generate_with_control(files_on_disk, tmp_path, capsys):
    from vidsynth.cli import main
    from vidsynth.render import read_recipe
    from vidsynth.video_io import load_video, save_video, video_info

    root, files = files_on_disk
    guide = save_video([f.resize((64, 48)) for f in control_frames(0)[:3]], tmp_path / "guide.gif", fps=8)
    out = tmp_path / "out.gif"
    code = main(["generate", "--base", str(files["base"]), "--motion", str(files["motion"]), "--prompt", "a fox",
                 "--control", f"{files['controlnet']}:tile:0.8", "--control-frames", str(guide), "--steps", "1",
                 "--size", "64x48", "--device", "cpu", "-o", str(out)])
    assert code == 0 and video_info(out)["frames"] == 3  # --frames taken from the control video
    recipe = read_recipe(out)  # the units and the video they follow are in the recipe: --recipe renders them again
    assert [(ref.name, ref.processor, ref.alpha) for ref in recipe.controlnets] == [
        (Path(files["controlnet"]).name, "tile", 0.8)]
    assert recipe.control_frames.name == "guide.gif" and recipe.control_frames.sha256
    assert main(["inspect", str(out)]) == 0
    assert "(tile, scale 0.8)" in capsys.readouterr().out
    assert main(["generate", "--recipe", str(out), "--device", "cpu", "-o", str(tmp_path / "again.gif")]) == 0
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(load_video(out), load_video(tmp_path / "again.gif")))
    uncontrolled = tmp_path / "plain.gif"
    assert main(["generate", "--base", str(files["base"]), "--motion", str(files["motion"]), "--prompt", "a fox",
                 "--frames", "3", "--steps", "1", "--size", "64x48", "--device", "cpu", "-o", str(uncontrolled)]) == 0
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(load_video(out), load_video(uncontrolled)))
    code = main(["generate", "--base", str(files["base"]), "--prompt", "a fox", "--control", "x.pth:tile",
                 "-o", str(out)])
    assert code == 2 and "--control and --control-frames go together" in capsys.readouterr().err
