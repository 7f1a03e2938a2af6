"""What this machine runs fastest: the default dtype on CPU, the convolution memory layout, and the layout helpers
the models use so a channels-last tensor stays channels-last through GroupNorm, attention and the motion modules.

oneDNN on CPU computes bfloat16 convolutions in NHWC. Fed NCHW tensors and weights it converts the input,
the weights and the output on every call (about a third of the VAE decoder's time in bfloat16); with channels-last
weights and activations it converts nothing. In float32 both layouts cost the same here, so NCHW is kept there.

glibc's malloc maps each block above its mmap threshold (128 KiB, rising to at most 32 MiB) on its own and unmaps it
when freed, and returns the heap's free top beyond the trim threshold, so the large activations of every step are
faulted in and zeroed by the kernel page by page again: about a tenth of a bfloat16 denoise here.
:func:`reusing_freed_memory` keeps freed blocks in the heap while the sampler runs and trims it afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading

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


# mallopt parameters (malloc.h) and glibc's defaults, restored after a render
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_reuse_lock = threading.Lock()
_reuse_depth = 0


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library's symbols (Linux only; None elsewhere or where they cannot be reached)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    c = libc()
    return c if c is not None and hasattr(c, "mallopt") and hasattr(c, "malloc_trim") else None  # musl lacks them


@contextlib.contextmanager
def reusing_freed_memory(device: str | torch.device = "cpu"):
    """Within the block, CPU memory freed by torch stays in the process's heap for the next tensor instead of going
    back to the kernel (glibc: ``mallopt`` M_MMAP_MAX 0 and an unbounded M_TRIM_THRESHOLD, what
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` set for a whole process); on leaving it the free heap pages are
    returned (``malloc_trim``) and glibc's default limits restored (as fixed values: glibc stops adjusting them once
    they are set). Peak memory stays about that of the largest step. Does nothing off Linux/glibc, for other devices,
    or with ``VIDSYNTH_MALLOC=system``. Nestable and thread-safe (the setting is the process's)."""
    global _reuse_depth
    libc = _glibc() if torch.device(device).type == "cpu" and os.environ.get("VIDSYNTH_MALLOC") != "system" else None
    if libc is None:
        yield
        return
    with _reuse_lock:
        if _reuse_depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
        _reuse_depth += 1
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
