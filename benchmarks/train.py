"""Seconds per MotionLoRA training step and peak memory (not a test).

    python benchmarks/train.py                    # tiny models on the CPU, 64x64, 8 frames, global batch 2:
                                                  # 1 process (batch 2) vs 2 processes (batch 1 each) under
                                                  # accelerate launch (gloo)
    python benchmarks/train.py --processes 1      # only one of them
    python benchmarks/train.py --full             # SD 1.5 + motion module v2 sizes (random weights), 256x256,
                                                  # 16 frames, batch 1, fp16 mixed precision, on the GPU, with and
                                                  # without gradient checkpointing
    python benchmarks/train.py --full --base v1-5-pruned-emaonly.safetensors --motion mm_sd_v15_v2.ckpt

Data: synthetic moving-square mp4 clips written to a temporary folder. The first --warmup steps and the last step
(it writes the final checkpoint) are left out of the timing.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vidsynth.models.motion import MotionModuleSet
from vidsynth.models.text import CLIPTextModel, TextEncoderConfig
from vidsynth.models.unet import UNetConfig, UNetModel
from vidsynth.models.vae import AutoencoderKL, VAEConfig
from vidsynth.tokenizer import CLIPTokenizer
from vidsynth.train import TrainConfig, Trainer, TrainModels, new_motion_modules
from vidsynth.video_io import save_video

SD15_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                       transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, context_dim=768, num_heads=8)
TINY_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       transformer_depth=(1, 1), transformer_depth_middle=1, context_dim=32, num_heads=4)


def random_models(full: bool) -> TrainModels:
    torch.manual_seed(0)
    unet = UNetModel(SD15_UNET if full else TINY_UNET)
    vae = AutoencoderKL(VAEConfig() if full else VAEConfig(base_channels=8, channel_mult=(1, 1, 1, 1),
                                                           num_res_blocks=1, norm_groups=4))
    text = CLIPTextModel(TextEncoderConfig(49408, 768, 12, 12, 77, "quick_gelu", None, "hf") if full else
                         TextEncoderConfig(49408, 32, 1, 2, 77, "quick_gelu", None, "hf"))
    motion = MotionModuleSet(new_motion_modules(unet, "v2", 32 if full else 16).config)  # random, not zero-init
    return TrainModels(unet, vae, text, CLIPTokenizer(), motion)


def write_clips(folder: Path, count: int, frames: int, size: int) -> None:
    rows = [["path", "caption"]]
    side = size // 4
    for k in range(count):
        video = np.full((frames, size, size, 3), 20, np.uint8)
        for i in range(frames):
            x = (k * 3 + i * size // (2 * frames)) % (size - side)
            video[i, size // 2 - side // 2:size // 2 + side // 2, x:x + side] = (255, 80 + 40 * k % 175, 60)
        save_video(video, folder / f"clip{k}.mp4", fps=8)
        rows.append([f"clip{k}.mp4", "a bright square moving right"])
    with (folder / "captions.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def measure(args, full: bool, checkpointing: bool, batch: int) -> dict:
    """Train args.warmup + steps + 1 steps; seconds per step, peak memory and the run's description."""
    frames, size = (16, 256) if full else (8, 64)
    steps = args.steps or (20 if full else 30)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        write_clips(data, 4, frames + 4, size)
        config = TrainConfig(data_root=str(data), frames=frames, stride=1, size=size, rank=64 if full else 8,
                             max_steps=args.warmup + steps + 1, batch_size=batch, learning_rate=1e-4,
                             mixed_precision="fp16" if full else "no", device=None if full else "cpu",
                             gradient_checkpointing=checkpointing, checkpoint_every=10**9,
                             output_dir=str(Path(tmp) / "out"), num_workers=2 if full else 0,
                             base=args.base, motion_module=args.motion)
        if args.base:
            from vidsynth.train import make_accelerator
            models = TrainModels.load(config, make_accelerator(config).device, torch.float16)
        else:
            models = random_models(full)
        trainer = Trainer("motion-lora", config, models)
        if full:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []

        def tick(step: int, loss: float) -> None:
            if full:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        trainer.run(on_step=tick)
    per_step = [b - a for a, b in zip(times[args.warmup - 1:-2], times[args.warmup:-1])]
    acc = trainer.accelerator
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    return {"median": statistics.median(per_step), "mean": statistics.mean(per_step), "steps": len(per_step),
            "rss": acc.gather(rss).max().item() if acc.num_processes > 1 else rss.item(),
            "gpu": torch.cuda.max_memory_allocated() / 2**30 if full else None,
            "processes": acc.num_processes, "global_batch": trainer.global_batch, "size": size, "frames": frames,
            "trainable": sum(p.numel() for p in trainer.setup.trainable.parameters()) / 1e6,
            "main": acc.is_main_process}


def report(result: dict, full: bool, checkpointing: bool) -> None:
    where = torch.cuda.get_device_name() if full else f"CPU, {torch.get_num_threads()} thread(s) per process"
    print(f"MotionLoRA training, {'SD 1.5 + v2 sizes' if full else 'tiny models'}, {result['size']}x{result['size']}, "
          f"{result['frames']} frames, global batch {result['global_batch']} on {result['processes']} process(es), "
          f"{'fp16' if full else 'no'} mixed precision, gradient checkpointing {'on' if checkpointing else 'off'}, "
          f"{where}; {result['trainable']:.2f}M trainable parameters")
    print(f"  seconds per step: median {result['median']:.4f}, mean {result['mean']:.4f} over {result['steps']} steps")
    if full:
        print(f"  peak GPU memory allocated: {result['gpu']:.2f} GiB")
    print(f"  peak RSS of the largest process: {result['rss']:.2f} GiB")


def launch_processes(args, count: int) -> None:
    """This script again under ``accelerate launch`` with ``count`` CPU processes (gloo), the global batch fixed."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_processes", str(count)] + (["--multi_gpu"] if count > 1 else []) + \
        [__file__, "--worker", "--global-batch", str(args.global_batch), "--threads", str(args.threads),
         "--warmup", str(args.warmup)] + (["--steps", str(args.steps)] if args.steps else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(command, check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="SD 1.5 + v2 sizes, 256x256, 16 frames, fp16, GPU")
    parser.add_argument("--base", help="--full: load this SD 1.5 file instead of random weights")
    parser.add_argument("--motion", help="--full: load this motion module file (with --base)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 full / 30 tiny)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", choices=["both", "on", "off"], default="both",
                        help="--full: which variants to run")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="tiny: CPU process counts")
    parser.add_argument("--global-batch", type=int, default=2, help="tiny: clips per optimizer step, all processes")
    parser.add_argument("--threads", type=int, default=1, help="tiny: CPU threads per process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = max(1, args.warmup)
    if args.full:
        if not torch.cuda.is_available():
            parser.error("--full needs a CUDA GPU")
        for checkpointing in {"both": (False, True), "on": (True,), "off": (False,)}[args.gradient_checkpointing]:
            report(measure(args, True, checkpointing, 1), True, checkpointing)
            torch.cuda.empty_cache()
    elif args.worker:
        torch.set_num_threads(args.threads)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.global_batch % world:
            parser.error(f"--global-batch {args.global_batch} does not split over {world} processes")
        result = measure(args, False, False, args.global_batch // world)
        if result["main"]:
            report(result, False, False)
    else:
        for count in args.processes:
            launch_processes(args, count)


if __name__ == "__main__":
    main()
