"""Training on several processes (accelerate over torch.distributed, gloo on the CPU) against one process.

Launched as users launch it: ``accelerate launch --multi_gpu --num_processes 2 -m vidsynth train ...`` with
``device: cpu`` (accelerate then runs MULTI_CPU on gloo; its ``--cpu`` flag alone starts a single process unless an
MPI hostfile is given). Kept tiny: a few optimizer steps on 128x128 clips of 4 frames. (At 64x64 the deepest level
of SD 1.5's structure is 1x1, GroupNorm groups hold two values, and the gradients are so ill-conditioned that the
rounding of a different batch split grows to 100%, also within one process.)
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from test_train import write_set, write_tiny_sd15_file
from vidsynth.manager import ModelManager
from vidsynth.train import new_motion_modules, run_from_config
from vidsynth.train.stages import motion_file_state
from vidsynth.models.motion import MotionModuleSet

SRC = Path(__file__).resolve().parents[1] / "src"


def write_motion_file(base: Path, path: Path) -> None:
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.load_models([base])
    torch.manual_seed(3)
    motion = MotionModuleSet(new_motion_modules(manager.unet, "v2", 16).config)  # random, as a trained module
    torch.save(motion_file_state(motion), path)


def write_config(path: Path, **values) -> Path:
    path.write_text("".join(f"{key}: {value}\n" for key, value in values.items()))
    return path


def losses(run: Path) -> list[float]:
    with (run / "loss.csv").open() as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def assert_same_weights(a: Path, b: Path) -> float:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x.keys() == y.keys()
    worst = max((x[k] - y[k]).abs().max().item() / max(x[k].abs().max().item(), 1e-8) for k in x)
    assert worst < 1e-4, f"{a} and {b} differ by {worst:.2e} of the tensor scale"
    return worst


def test_two_processes_train_what_one_does_and_one_process_resumes(tmp_path):
    """2 processes x batch 1 x 2 accumulation steps == 1 process x batch 4 (same global batch, seed): the weights
    after 2 steps agree to 1e-4 of each tensor's scale (measured 7e-6) and so do the losses; a 1-process run resumed
    from the 2-process checkpoint continues the 1-process loss curve (rtol 1e-4).

    Adam's first updates are ``lr * g / (|g| + eps)``: with the default eps 1e-8 every element whose gradient is at
    rounding level (LoRA ``up`` rows start at zero) moves by +-lr on the sign of float noise, so two correct runs
    differ by 100% there. eps 1e-2 keeps the update linear in such gradients and the comparison meaningful."""
    colors = [(255, 60, 60), (60, 255, 60), (60, 60, 255), (255, 255, 60)]
    data = write_set(tmp_path / "clips", [(3 * k, c) for k, c in enumerate(colors)], [".gif"] * 4)
    base, motion = tmp_path / "tiny_sd15.safetensors", tmp_path / "mm_tiny.ckpt"
    write_tiny_sd15_file(base, levels=4)
    write_motion_file(base, motion)
    common = dict(base=base, motion_module=motion, data_root=data, frames=4, stride=1, size=128, rank=4,
                  learning_rate="1e-2", adam_epsilon="1e-2", caption_dropout=0.5, checkpoint_every=2, device="cpu", seed=0)
    two, one = tmp_path / "two", tmp_path / "one"

    config = write_config(tmp_path / "two.yaml", **common, batch_size=1, gradient_accumulation_steps=2, max_steps=2,
                          output_dir=two)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "vidsynth", "train", "motion-lora", "--config", str(config)]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "global batch 4 = batch_size 1 x 2 process(es) x 2 accumulation step(s)" in done.stdout
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002"]  # rank 0 wrote it, once
    assert len(losses(two)) == 2  # one loss row per step: only rank 0 logs

    torch.set_num_threads(1)
    run_from_config("motion-lora", write_config(tmp_path / "one.yaml", **common, batch_size=4, max_steps=4,
                                                output_dir=one))
    worst = assert_same_weights(two / "motion_lora.ckpt", one / "checkpoints" / "step-000002" / "motion_lora.ckpt")
    print(f"2 processes vs 1 after 2 steps: weights differ by {worst:.2e} of the tensor scale")
    np.testing.assert_allclose(losses(two), losses(one)[:2], rtol=1e-4)

    # the 2-process run, resumed on 1 process (same global batch), continues the 1-process curve
    run_from_config("motion-lora", write_config(tmp_path / "resume.yaml", **common, batch_size=4, max_steps=4,
                                                output_dir=two, resume="latest"))
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)
    worst = assert_same_weights(two / "motion_lora.ckpt", one / "motion_lora.ckpt")
    print(f"resumed on 1 process vs 1 process throughout, after 4 steps: {worst:.2e} of the tensor scale")
