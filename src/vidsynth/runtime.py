"""What this machine runs fastest: the default dtype on CPU, the convolution memory layout, and the layout helpers
the models use so a channels-last tensor stays channels-last through GroupNorm, attention and the motion modules.

oneDNN on CPU computes bfloat16 convolutions in NHWC. Fed NCHW tensors and weights it converts the input,
the weights and the output on every call (about a third of the VAE decoder's time in bfloat16); with channels-last
weights and activations it converts nothing. In float32 both layouts cost the same here, so NCHW is kept there.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

_LAYOUT_KEY = "_vidsynth_conv_layout"


@functools.lru_cache(maxsize=None)
def cpu_runs_bf16_natively() -> bool:
    """True when the CPU has AMX tiles or AVX-512 BF16 instructions (bfloat16 matmuls and convolutions in
    hardware, about 3x float32 on such machines)."""
    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on CUDA; on CPU bfloat16 where the CPU runs it natively, float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_runs_bf16_natively():
        return torch.bfloat16
    return torch.float32


def conv_memory_format(device: torch.device, dtype: torch.dtype) -> torch.memory_format:
    """The convolution layout that needs no per-call conversion on ``device`` in ``dtype``."""
    # float16 stays NCHW: oneDNN's channels-last float16 path on CPU loses accuracy (4x the frame error)
    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.channels_last
    return torch.contiguous_format


def prepare_convolutions(module: nn.Module, reference: torch.Tensor) -> None:
    """Put the 4-D weights of ``module`` into :func:`conv_memory_format` for ``reference``'s device and dtype (a
    parameter of the module); done once per device/dtype, and only without autograd (training keeps NCHW, as
    optimizers and checkpoint writers expect contiguous tensors)."""
    key = (reference.device, reference.dtype)
    if getattr(module, _LAYOUT_KEY, None) == key or torch.is_grad_enabled():
        return
    fmt = conv_memory_format(*key)
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d) and not sub.weight.is_contiguous(memory_format=fmt):
            sub.weight.data = sub.weight.data.contiguous(memory_format=fmt)
    setattr(module, _LAYOUT_KEY, key)


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out NHWC in memory (and not also plain contiguous, as 1x1 or 1-channel tensors are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format
