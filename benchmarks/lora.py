"""Denoising-step time with 0, 1 and 3 LoRAs, run-time hooks vs merged weights (not a test).

    python benchmarks/lora.py [--channels 64] [--frames 8] [--size 32] [--repeats 3]

A UNet with SD 1.5's block structure (width set by --channels; context 768) steps on a CFG batch of
2 x frames latents. The LoRAs are random rank-32 kohya-style files on every attention projection, proj_in/out and
feed-forward layer (what typical SD 1.5 LoRAs touch), read through the same name map as real files.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from vidsynth.lora import build_lora, unet_name_map
from vidsynth.models.unet import UNetConfig, UNetModel


def random_lora(unet: UNetModel, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for diffusers_name, name in unet_name_map(unet).items():
        module = unet.get_submodule(name)
        if diffusers_name == name or not any(p in name for p in ("attn", "proj_", "ff.net")):
            continue
        key = "lora_unet_" + diffusers_name.replace(".", "_")
        inner = (1, 1) if isinstance(module, nn.Conv2d) else ()
        ins, outs = (module.in_channels, module.out_channels) if inner else (module.in_features, module.out_features)
        state[key + ".lora_down.weight"] = torch.randn(rank, ins, *inner, generator=g) * 0.01
        state[key + ".lora_up.weight"] = torch.randn(outs, rank, *inner, generator=g) * 0.01
        state[key + ".alpha"] = torch.tensor(float(rank))
    return state


def step_time(unet: UNetModel, x: torch.Tensor, context: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        unet(x, 500.0, context)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            unet(x, 500.0, context)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = UNetConfig(in_channels=4, out_channels=4, model_channels=args.channels, channel_mult=(1, 2, 4, 4),
                        num_res_blocks=2, transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
                        context_dim=768, num_heads=8)
    unet = UNetModel(config).eval().requires_grad_(False)
    x = torch.randn(2 * args.frames, 4, args.size, args.size)
    context = torch.randn(2 * args.frames, 77, 768)
    print(f"UNet {args.channels} channels (SD 1.5 blocks), batch {x.shape[0]} x 4 x {args.size} x {args.size}, "
          f"{torch.get_num_threads()} threads")
    base = step_time(unet, x, context, args.repeats)
    print(f"0 LoRAs:            {base * 1e3:8.1f} ms/step")
    for count in (1, 3):
        loras = [build_lora({"unet": unet}, random_lora(unet, 32, seed), kind="lora_kohya") for seed in range(count)]
        runtime = step_time(unet, x, context, args.repeats)
        for lora in loras:
            lora.merge()
        merged = step_time(unet, x, context, args.repeats)
        print(f"{count} LoRA{'s' if count > 1 else ' '} ({len(loras[0].layers)} layers each): runtime "
              f"{runtime * 1e3:8.1f} ms/step ({runtime / base - 1:+.0%}), merged {merged * 1e3:8.1f} ms/step "
              f"({merged / base - 1:+.0%})")
        for lora in loras:
            lora.remove()


if __name__ == "__main__":
    main()
