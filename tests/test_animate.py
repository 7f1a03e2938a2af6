"""`vidsynth animate CONFIG.yaml`: the original AnimateDiff prompt configs as they are. Fast tests on tiny files for the
keys and their defaults; then every YAML of ../shared/animatediff-prompt-configs on full-size random files in the
real layouts, compared frame for frame with `vidsynth generate`."""
from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import SHARED, shared_or_skip
from tiny_files import write_tiny_files
from vidsynth import configs
from vidsynth.cli import main
from vidsynth.errors import ConfigError
from vidsynth.render import read_recipe
from vidsynth.video_io import load_video

REPO = Path(__file__).resolve().parents[1]
BIGMEM_LOCK = "/tmp/vidsynth-bigmem.lock"
SMALL = ["--W", "32", "--H", "32", "--L", "2", "--steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def workdir(tiny, tmp_path, monkeypatch):
    """A working directory laid out like the original repository's, with tiny files at the configs' paths."""
    for link, target in {"models/DreamBooth_LoRA/base.safetensors": tiny["base"],
                         "models/Motion_Module/mm.ckpt": tiny["motion"],
                         "models/MotionLoRA/zoom.ckpt": tiny["motion_lora"]}.items():
        (tmp_path / link).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / link).symlink_to(target)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, document) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_list_format_keys_defaults_outputs_and_seeds(workdir, caplog):
    config = write(workdir / "my.yaml", [{
        "dreambooth_path": "models/DreamBooth_LoRA/base.safetensors", "lora_model_path": "",
        "inference_config": "configs/inference/inference-v2.yaml", "motion_module": "models/Motion_Module/mm.ckpt",
        "motion_module_lora_configs": [{"path": "models/MotionLoRA/zoom.ckpt", "alpha": 0.6}],
        "seed": [12192490710448890259, -1], "steps": 25, "guidance_scale": 6.0, "my_own_key": 1,
        "prompt": ["a/b fox one two three four five six seven eight nine ten eleven", "second"],
        "n_prompt": ["worst quality"]}])
    with caplog.at_level(logging.WARNING):
        assert main(["animate", str(config), "--output-dir", "out", *SMALL]) == 0
    assert "ignoring unknown keys my_own_key" in caplog.text
    out = workdir / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0-ab-fox-one-two-three-four-five-six-seven-eight.gif", "1-second.gif", "config.yaml"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    seeds = saved[0]["random_seed"]
    assert seeds[0] == 12192490710448890259 and 0 <= seeds[1] < 2**64 and seeds[1] != -1
    first, second = (read_recipe(out / n) for n in names[:2])
    assert (first.seed, second.seed) == tuple(seeds)
    assert first.negative_prompt == second.negative_prompt == "worst quality"  # one n_prompt for every prompt
    assert (first.steps, first.cfg_scale, first.width, first.height, first.frames, first.fps) == (1, 6.0, 32, 32, 2, 8)
    assert first.sampler == "ddim" and first.sampler_options == configs.INFERENCE_CONFIGS["inference-v2"]
    assert [(lora.name, lora.alpha) for lora in first.loras] == [("zoom.ckpt", 0.6)]


def test_mapping_format_renders_every_motion_module(workdir, tiny):
    (workdir / "models/Motion_Module/other.ckpt").symlink_to(tiny["motion"])
    config = write(workdir / "old.yaml", {"Fox": {
        "motion_module": ["models/Motion_Module/mm.ckpt", "models/Motion_Module/other.ckpt"],
        "dreambooth_path": "models/DreamBooth_LoRA/base.safetensors", "lora_model_path": "",
        "seed": 5, "steps": 25, "guidance_scale": 7.5, "prompt": ["fox"], "n_prompt": [""]}})
    outputs = configs.run_config(config, width=32, height=32, frames=2, steps=1, video_format="mp4",
                                 output_dir=workdir / "o", device="cpu", progress_bar=False)
    assert [p.name for p in outputs] == ["0-fox.mp4", "1-fox.mp4", "config.yaml"]
    assert [read_recipe(p).motion.name for p in outputs[:2]] == ["mm.ckpt", "other.ckpt"]
    assert yaml.safe_load(outputs[-1].read_text())["Fox"]["random_seed"] == [5, 5]
    assert [np.asarray(f) for f in load_video(outputs[0])][0].shape == (32, 32, 3)


def test_adapter_scale_and_legacy_domain_lora_scale(workdir, caplog):
    entry = {"adapter_lora_path": "models/MotionLoRA/zoom.ckpt", "domain_lora_scale": 0.3,
             "dreambooth_path": "models/DreamBooth_LoRA/base.safetensors", "motion_module": "models/Motion_Module/mm.ckpt",
             "prompt": ["p"], "n_prompt": [""], "lora_model_path": "models/MotionLoRA/zoom.ckpt"}
    with caplog.at_level(logging.WARNING):
        _, (job,) = configs.plan_jobs(write(workdir / "a.yaml", [entry]))
    assert "domain_lora_scale is read as adapter_lora_scale" in caplog.text
    assert [alpha for _, alpha in job.loras] == [0.8, 0.3]  # lora_alpha default 0.8, then the adapter
    assert (job.width, job.height, job.frames, job.steps, job.cfg_scale) == (512, 512, 16, None, None)
    _, (job,) = configs.plan_jobs(write(workdir / "b.yaml", [{**entry, "adapter_lora_scale": 0.9}]))
    assert [alpha for _, alpha in job.loras] == [0.8, 0.9]
    assert job.sampler_options == {"sampler": "ddim", **configs.INFERENCE_CONFIGS["inference-v1"]}  # the CLI default


@pytest.mark.parametrize("change, message", [
    ({"motion_module": "models/Motion_Module/missing.ckpt"}, "motion_module 'models/Motion_Module/missing.ckpt' is not a file"),
    ({"dreambooth_path": "elsewhere/x.safetensors"}, "dreambooth_path 'elsewhere/x.safetensors' is not a file"),
    ({"motion_module_lora_configs": [{"alpha": 1.0}]}, r"motion_module_lora_configs\[0\] must be"),
    ({"seed": 2**64}, "seed must be an integer in"),
    ({"seed": "abc"}, "seed must be"),
    ({"inference_config": "configs/inference/inference-sd21.yaml"}, "neither a file nor one of the original"),
    ({"controlnet_path": "models/SparseCtrl/v3_sd15_sparsectrl_rgb.ckpt", "controlnet_config": "c.yaml",
      "controlnet_images": ["missing.png"]}, "controlnet_path 'models/SparseCtrl/v3_sd15_sparsectrl_rgb.ckpt' is not"),
    ({"prompt": None}, "prompt must be a list"),
])
def test_bad_entries_are_refused_before_loading(workdir, change, message):
    entry = {"dreambooth_path": "models/DreamBooth_LoRA/base.safetensors", "motion_module": "models/Motion_Module/mm.ckpt",
             "prompt": ["p"], "n_prompt": [""], "seed": 1, **change}
    with pytest.raises(ConfigError, match=message):
        configs.plan_jobs(write(workdir / "bad.yaml", [entry]))


# ---- the original repository's configs on full-size random files -------------------------------------------------

# the files the configs name, by the layout that stands in for them (DreamBooth models are SD 1.5 single files;
# mm_sd_v14 has mm_sd_v15's layout; every MotionLoRA has ZoomIn's)
STAND_INS = {
    "models/DreamBooth_LoRA/toonyou_beta3.safetensors": "v1-5-pruned-emaonly.safetensors",
    "models/DreamBooth_LoRA/realisticVisionV60B1_v51VAE.safetensors": "v1-5-pruned-emaonly.safetensors",
    "models/Motion_Module/mm_sd_v14.ckpt": "mm_sd_v15.ckpt",
    "models/Motion_Module/mm_sd_v15.ckpt": "mm_sd_v15.ckpt",
    "models/Motion_Module/mm_sd_v15_v2.ckpt": "mm_sd_v15_v2.ckpt",
    "models/Motion_Module/v3_sd15_mm.ckpt": "v3_sd15_mm.ckpt",
    "models/Motion_Module/v3_sd15_adapter.ckpt": "v3_sd15_adapter.ckpt",
    "models/SparseCtrl/v3_sd15_sparsectrl_rgb.ckpt": "v3_sd15_sparsectrl_rgb.ckpt",
    **{f"models/MotionLoRA/v2_lora_{m}.ckpt": "v2_lora_ZoomIn.ckpt" for m in (
        "ZoomIn", "ZoomOut", "PanLeft", "PanRight", "TiltUp", "TiltDown", "RollingClockwise", "RollingAnticlockwise")},
}
SHARED_CONFIGS = SHARED / "animatediff-prompt-configs"
# bfloat16 (this CPU's fast dtype) and float16 DreamBooth stand-ins, as the real ToonYou / RealisticVision files are:
# the same layouts and code paths at a third of float32's time (these configs were ~7 of the suite's 18 minutes)
CPU_BF16 = ["--device", "cpu", "--dtype", "bfloat16"]
FULL = ["--W", "64", "--H", "64", "--L", "4", "--steps", "2", *CPU_BF16]
STAND_IN_DTYPES = {"v1-5-pruned-emaonly.safetensors": "float16"}


@pytest.fixture(scope="module")
def original_layout(full_checkpoint, tmp_path_factory):
    """``lay_out(config) -> root``: a folder laid out like the original repository, holding (as links to full-size
    random files, each made once) the models ``config`` names and its SparseCtrl keyframe images."""
    from PIL import Image

    shared_or_skip()
    root = tmp_path_factory.mktemp("animatediff_repo")

    def lay_out(config: Path) -> Path:
        text = config.read_text()
        for link, layout in STAND_INS.items():
            if link in text and not (root / link).exists():
                (root / link).parent.mkdir(parents=True, exist_ok=True)
                (root / link).symlink_to(full_checkpoint(layout, STAND_IN_DTYPES.get(layout)))
        for entry in configs.read_config(config)[1]:  # keyframe images (repository assets): any picture will do
            for image in entry[1].get("controlnet_images") or []:
                (root / image).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (96, 64), (200, 120, 40)).save(root / image)
        return root

    return lay_out


def bigmem(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """One vidsynth command on full-size models: in its own process (the memory goes back) while this process holds
    the shared lock (flock(2), as `flock LOCK command` takes it), so the time limit counts the run, not the wait."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with open(BIGMEM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return subprocess.run([sys.executable, "-m", "vidsynth", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=1800)


def expected_videos(config: Path) -> list[tuple[str, str, int]]:
    _, jobs = configs.plan_jobs(config)
    return [video for job in jobs for video in job.videos]


@pytest.mark.parametrize("name", sorted(p.name for p in SHARED_CONFIGS.glob("*.yaml")) or ["(shared absent)"])
def test_full_size_original_configs_as_they_are(original_layout, name, monkeypatch, capsys):
    """Full size (SD 1.5 2.1 GB float16 + motion modules 0.8-1.8 GB, bfloat16 on the CPU), 64x64, 4 frames, 2 steps."""
    config = SHARED_CONFIGS / name
    root = original_layout(config)
    out = root / "samples" / Path(name).stem
    monkeypatch.chdir(root)  # the configs' paths are relative to the working directory
    if "controlnet_image_indexs: [0,5,10,15]" in config.read_text():
        # its 3-interpolation entry puts keyframes at frames 5, 10, 15: at --L 4 it cannot run (the original fails
        # there too, with an IndexError after rendering the entries before it); refused before anything is loaded,
        # so in this process
        assert main(["animate", str(config), "--output-dir", str(out), *FULL]) == 2
        assert "controlnet_image_indexs [5, 10, 15] lie outside the 4-frame video" in capsys.readouterr().err
        assert not out.exists() or not any(out.glob("*.gif"))
        return
    run = bigmem(["animate", str(config), "--output-dir", str(out), *FULL], root)
    assert run.returncode == 0, run.stderr[-3000:]
    videos = expected_videos(config)
    gifs = sorted(out.glob("*.gif"), key=lambda p: int(p.name.split("-")[0]))
    assert [p.name for p in gifs] == [configs.video_name(i, prompt, "gif") for i, (prompt, _, _) in enumerate(videos)]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    entries = saved if isinstance(saved, list) else list(saved.values())
    recorded = [seed for entry in entries for seed in entry["random_seed"]]
    assert recorded == [seed for _, _, seed in videos]  # these configs give every seed
    for gif, (prompt, negative, seed) in zip(gifs, videos):
        recipe = read_recipe(gif)
        assert (recipe.prompt, recipe.negative_prompt, recipe.seed) == (prompt, negative, seed)
        frames = load_video(gif)
        assert len(frames) == 4 and frames[0].size == (64, 64)

    # the first video again through `vidsynth generate` with the same settings: the same frames
    recipe = read_recipe(gifs[0])
    args = ["generate", "--base", recipe.base.path, "--motion", recipe.motion.path, "--prompt", recipe.prompt,
            "--negative", recipe.negative_prompt, "--seed", str(recipe.seed), "--cfg", str(recipe.cfg_scale),
            "--fps", "8", "-o", str(out / "g.gif")]
    for lora in recipe.loras:
        args += ["--lora", f"{lora.path}:{lora.alpha}"]
    run = bigmem(args + ["--size", "64x64", "--frames", "4", "--steps", "2", *CPU_BF16],
                 root)
    assert run.returncode == 0, run.stderr[-3000:]
    again = load_video(out / "g.gif")
    assert len(again) == 4
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(load_video(gifs[0]), again))


def tiny_sparsectrl(path: Path) -> Path:
    """A random RGB SparseCtrl file in the original layout that fits tiny_files' UNet (diffusers' model, renamed)."""
    import torch
    from diffusers import SparseControlNetModel

    from test_sparsectrl import to_ours

    torch.manual_seed(5)
    model = SparseControlNetModel(conditioning_channels=4, use_simplified_condition_embedding=True,
                                  block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, attention_head_dim=8,
                                  conditioning_embedding_out_channels=(8, 8, 16, 16), motion_max_seq_length=32,
                                  motion_num_attention_heads=8)
    with torch.no_grad():  # its zero-initialised output convolutions would make the keyframes do nothing
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape) * p[0].numel() ** -0.5)
    torch.save(to_ours(model.state_dict()), path)  # a flat dict, as the released files
    return path


def test_sparsectrl_entry_conditions_on_its_keyframes(workdir):
    from PIL import Image

    tiny_sparsectrl(workdir / "models/sparsectrl_rgb.ckpt")
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (48, 32), colour).save(workdir / f"key{i}.png")
    entry = {"dreambooth_path": "models/DreamBooth_LoRA/base.safetensors", "motion_module": "models/Motion_Module/mm.ckpt",
             "controlnet_config": "configs/inference/sparsectrl/latent_condition.yaml",
             "controlnet_path": "models/sparsectrl_rgb.ckpt", "controlnet_images": ["key0.png", "key1.png"],
             "controlnet_image_indexs": [0, -1], "seed": 3, "prompt": ["p"], "n_prompt": [""]}
    plain = {k: v for k, v in entry.items() if not k.startswith("controlnet")}
    with_keys = configs.run_config(write(workdir / "s.yaml", [entry]), width=32, height=32, frames=2, steps=1,
                                   output_dir=workdir / "s", device="cpu", progress_bar=False)
    without = configs.run_config(write(workdir / "p.yaml", [plain]), width=32, height=32, frames=2, steps=1,
                                 output_dir=workdir / "p", device="cpu", progress_bar=False)
    a, b = (np.asarray(load_video(out[0])[0], dtype=np.float32) for out in (with_keys, without))
    assert np.abs(a - b).mean() > 1.0  # the keyframes move the frames
    with pytest.raises(ConfigError, match=r"controlnet_image_indexs \[5\] lie outside the 4-frame video"):
        configs.plan_jobs(write(workdir / "t.yaml", [{**entry, "controlnet_image_indexs": [0, 5]}]), frames=4)
    with pytest.raises(ConfigError, match="needs controlnet_config"):
        configs.plan_jobs(write(workdir / "u.yaml", [{**entry, "controlnet_config": ""}]))
