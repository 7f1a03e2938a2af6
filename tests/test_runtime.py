"""CPU runtime choices: the default dtype, channels-last convolutions in bf16, cross-attention K/V once per clip,
and what bf16 costs in quality against float32 on the same seed (tiny random models)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_models import tiny_sd15
from vidsynth import runtime
from vidsynth.models import layers
from vidsynth.models import unet as unet_module
from vidsynth.models.motion import TemporalTransformer, TemporalTransformerBlock

SIZE = dict(height=64, width=64)


def frames(pipe):
    return pipe(prompt="a fox", negative_prompt="blur", num_frames=4, num_inference_steps=2, seed=0,
                output_type="np", progress_bar=False, **SIZE)


def test_default_dtype_follows_the_cpu(monkeypatch):
    assert runtime.default_dtype("cuda") == torch.float16
    monkeypatch.setattr(runtime, "cpu_runs_bf16_natively", lambda: True)
    assert runtime.default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_runs_bf16_natively", lambda: False)
    assert runtime.default_dtype("cpu") == torch.float32


def test_cpu_probe_agrees_with_cpuinfo():
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this machine")
    runtime.cpu_runs_bf16_natively.cache_clear()
    assert runtime.cpu_runs_bf16_natively() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_bf16_frames_stay_close_to_float32():
    """Same seed, whole pipeline (text, 2 DDIM steps with CFG, motion v2, decode) in bf16 against float32: max
    |difference| measured 0.080 on the 0..1 scale, mean 0.008 (torch 2.13, AMX; 0.101 / 0.009 before the
    channels-last and per-clip K/V changes). Bounds: max 0.12, mean 0.015."""
    reference = frames(tiny_sd15("v2").pipeline())
    models = tiny_sd15("v2")
    for module in (models.unet, models.vae, *models.text_encoders, models.motion):
        module.to(torch.bfloat16)
    got = frames(models.pipeline())
    error = np.abs(got - reference)
    assert error.max() < 0.12 and error.mean() < 0.015


def test_channels_last_bf16_matches_nchw_bf16(monkeypatch):
    """bf16 UNet + motion on CPU: channels-last convolutions (the default) against NCHW ones; the conv weights are
    channels-last afterwards. Only the kernels' rounding differs: measured max 0.8% of the output scale; bound 3%."""
    models = tiny_sd15("v2")
    unet, motion = models.unet.to(torch.bfloat16), models.motion.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(8, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g).repeat_interleave(4, 0)
    with torch.inference_mode():
        fast = unet(x, 500.0, context, num_frames=4, motion=motion).float()
        assert unet.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
        assert fast.is_contiguous()
        monkeypatch.setattr(runtime, "conv_memory_format", lambda *_: torch.contiguous_format)
        unet._vidsynth_conv_layout = None
        plain = unet(x, 500.0, context, num_frames=4, motion=motion).float()
    assert unet.input_blocks[1][0].in_layers[2].weight.is_contiguous()
    assert (fast - plain).abs().max() <= 0.03 * plain.abs().max()


def test_shared_context_projected_once_per_clip(monkeypatch):
    """float32: one context per clip (K/V projected once, queries of all frames attend as one sequence) against the
    per-frame computation; measured max 1e-6 of the output scale. Per-frame contexts are left per frame."""
    models = tiny_sd15("v2")
    unet, motion = models.unet, models.motion
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(8, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g).repeat_interleave(4, 0)
    assert unet_module.per_clip_context(context, 4).shape == (2, 77, 32)
    varied = context.clone()
    varied[1] += 1
    assert unet_module.per_clip_context(varied, 4) is varied
    with torch.no_grad():
        shared = unet(x, 500.0, context, num_frames=4, motion=motion)
        monkeypatch.setattr(unet_module, "per_clip_context", lambda c, n: c)
        per_frame = unet(x, 500.0, context, num_frames=4, motion=motion)
    assert (shared - per_frame).abs().max() <= 1e-5 * per_frame.abs().max()


def test_memory_switches_keep_the_frames():
    """Model offload (here with the CPU as execution device: the hooks, the moves and the input routing run; the GPU
    case differs only in the device), VAE slicing and tiling give the frames of the plain call; slicing decodes one
    frame per call, tiling decodes tiles."""
    pipe = tiny_sd15("v2").pipeline()
    plain = frames(pipe)
    offload = pipe.enable_model_cpu_offload("cpu")
    assert frames(pipe).tolist() == plain.tolist() and offload.resident == [pipe.vae]
    calls = []
    handle = pipe.vae.decoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    pipe.enable_vae_slicing()
    sliced = frames(pipe)
    assert np.abs(sliced - plain).max() < 1e-5 and [c[0] for c in calls] == [1, 1, 1, 1]
    calls.clear()
    pipe.disable_vae_slicing()
    pipe.enable_vae_tiling()
    with torch.no_grad():
        pipe.decode(torch.randn(1, 4, 8, 72), output_type="np", batch_size=None, tiled=None, progress_bar=False)
    handle.remove()
    offload.remove()
    assert len(calls) > 1  # 72 latents wide: more than one 64-latent tile


_HEAP_PROBE = """
import json, os, torch
from vidsynth import runtime

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def touch_and_free(nbytes):
    block = torch.empty(nbytes, dtype=torch.uint8)
    block.fill_(1)  # the pages become resident
    del block

size, slack = 256 * 2**20, 64 * 2**20
start = rss()
touch_and_free(size)
report = {"plain": rss() - start}
with runtime.reusing_freed_memory("cpu"):
    touch_and_free(size)
    report["inside"] = rss() - start
    touch_and_free(size - slack)  # fits the freed block: no new pages
    report["inside again"] = rss() - start
report["after"] = rss() - start
print(json.dumps(report))
"""


@pytest.mark.skipif(runtime._glibc() is None, reason="the switch is glibc's mallopt; elsewhere it does nothing")
@pytest.mark.parametrize("setting", ["default", "system"])
def test_freed_memory_stays_in_the_heap_while_sampling(setting):
    """In a fresh process (whose heap has no large free blocks yet): a freed 256 MiB tensor goes back to the kernel
    (glibc mmaps blocks that large); inside reusing_freed_memory it stays resident and a later one is carved from it
    instead of growing the process; leaving the block trims the heap again. VIDSYNTH_MALLOC=system turns it off."""
    env = {**os.environ, "VIDSYNTH_MALLOC": setting}
    result = subprocess.run([sys.executable, "-c", _HEAP_PROBE], env=env, capture_output=True, text=True, check=True)
    grown = json.loads(result.stdout.splitlines()[-1])
    size, slack = 256 * 2**20, 64 * 2**20
    assert grown["plain"] < slack and grown["after"] < slack
    if setting == "system":
        assert grown["inside"] < slack
        return
    assert grown["inside"] > size - slack and grown["inside again"] < grown["inside"] + slack // 4


def test_the_sampler_runs_inside_the_heap_switch_and_the_decoder_outside():
    """The decoder's batch is budgeted on memory that is given back, so the heap is trimmed before it runs."""
    pipe = tiny_sd15("v2").pipeline()
    depth = {"unet": set(), "decoder": set()}
    pipe.unet.register_forward_hook(lambda *_: depth["unet"].add(runtime._reuse_depth))
    pipe.vae.decoder.register_forward_hook(lambda *_: depth["decoder"].add(runtime._reuse_depth))
    frames(pipe)
    assert depth == {"unet": {1}, "decoder": {0}}


class _CountingPointwise:
    """Wraps oneDNN's fused linear op and counts its calls (plain and with a residual)."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)

    def binary(self, *args):
        self.calls += 1
        return self.op.binary(*args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", ["spatial", "temporal"])
def test_fused_linear_epilogues(monkeypatch, block, dtype):
    """CPU inference runs every projection as one oneDNN call: GEGLU's gate with its GELU and its value half times
    that gate, every output projection with its residual add (in bf16 rounded once instead of two or three times),
    q/k/v and the rest plain (in float32 oneDNN instead of MKL's sgemm). Against a float64 run of the same block it
    is at least as close as the unfused path. bf16: max 0.028 both, mean 0.00233 against 0.00239 spatial; max 0.031
    both, mean 0.00268 against 0.00279 temporal (outputs of mean size 0.8). float32: max 4.2e-7 against 3.8e-7,
    mean 5.0e-8 against 4.7e-8 spatial; max 4.9e-7 against 5.4e-7, mean 7.4e-8 against 7.3e-8 temporal. A run-time
    hook on a projection (how run-time LoRAs attach) still runs."""
    torch.manual_seed(0)
    if block == "spatial":
        module = layers.BasicTransformerBlock(64, 4, 16, 32).eval()
        inputs = (torch.randn(4, 96, 64), torch.randn(4, 77, 32))
    else:
        module = TemporalTransformerBlock(64, 4, 24).eval()
        inputs = (torch.randn(96, 8, 64),)
    assert torch.backends.mkldnn.is_available() and layers._LINEAR_POINTWISE is not None
    with torch.inference_mode():
        reference = module.double()(*(t.double() for t in inputs))
        module.to(dtype)
        low = tuple(t.to(dtype) for t in inputs)
        counting = _CountingPointwise(layers._LINEAR_POINTWISE)
        monkeypatch.setattr(layers, "_LINEAR_POINTWISE", counting)
        fused = module(*low).double()
        # per attention q, k, v, out (2 attentions in either block), GEGLU 2, the feed-forward's output 1
        assert counting.calls == 11
        monkeypatch.setattr(layers, "_LINEAR_POINTWISE", None)
        plain = module(*low).double()
        monkeypatch.setattr(layers, "_LINEAR_POINTWISE", counting)
        handle = module.ff.net[2].register_forward_hook(lambda m, args, out: out + 1)
        hooked = module(*low).double()
        handle.remove()
    fused_error, plain_error = (fused - reference).abs(), (plain - reference).abs()
    if dtype == torch.bfloat16:
        assert fused_error.max() <= 1.1 * plain_error.max() and fused_error.mean() <= 1.02 * plain_error.mean()
    else:  # both at float32's rounding: another summation order, not less precision
        assert fused_error.max() < 1e-6 and fused_error.mean() <= 1.1 * plain_error.mean()
    assert (hooked - fused - 1).abs().max() < 0.1  # +1 from the hook, up to bf16 rounding of outputs ~1-4


@pytest.mark.parametrize("block", ["spatial", "temporal"])
def test_transformer_projections_take_the_fused_path(monkeypatch, block):
    """The projections around the blocks (SDXL's linear proj_in / proj_out, the motion module's) are oneDNN calls too:
    13 per transformer of one block, the same output as the plain float32 path up to summation order (measured max
    4.8e-7 both, outputs of mean size 0.85)."""
    torch.manual_seed(0)
    if block == "spatial":
        module = layers.SpatialTransformer(64, 4, 16, 1, 32, use_linear=True).eval()
        inputs = (torch.randn(4, 64, 6, 8), torch.randn(4, 77, 32))
    else:
        module = TemporalTransformer(64, heads=4, pe_length=24).eval()
        inputs = (torch.randn(16, 64, 6, 8), 8)
    with torch.inference_mode():
        counting = _CountingPointwise(layers._LINEAR_POINTWISE)
        monkeypatch.setattr(layers, "_LINEAR_POINTWISE", counting)
        fused = module(*inputs)
        assert counting.calls == 13
        monkeypatch.setattr(layers, "_LINEAR_POINTWISE", None)
        plain = module(*inputs)
    assert (fused - plain).abs().max() < 1e-5
