"""Model CPU offload for GPUs with little memory (diffusers' ``enable_model_cpu_offload``): every model waits in CPU
memory and moves to the GPU when it is called, sending the one there before back; the UNet and its motion
modules travel together. One model's weights on the GPU at a time, at the cost of a host-to-device copy per switch.
"""
from __future__ import annotations

import torch
from torch import nn


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class ModelOffload:
    """Groups of modules (each moved as a whole) sharing one execution device. ``entries`` of a group are the
    submodules whose call brings the group in (their inputs follow it onto the device)."""

    def __init__(self, device: torch.device):
        self.device, self.resident, self.handles = torch.device(device), None, []

    def add(self, group: list[nn.Module], entries: list[nn.Module]) -> None:
        for module in group:
            module.to("cpu")

        def bring_in(_module, args, kwargs):
            if self.resident is not group:
                if self.resident is not None:
                    for module in self.resident:
                        module.to("cpu")
                for module in group:
                    module.to(self.device)
                self.resident = group
            return _to(args, self.device), _to(kwargs, self.device)

        self.handles += [m.register_forward_pre_hook(bring_in, with_kwargs=True) for m in entries]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def enable_model_cpu_offload(pipe, device: str | torch.device = "cuda") -> ModelOffload:
    """Install the offload on ``pipe``'s UNet (+ motion modules), text encoders and VAE; ``pipe.device`` becomes the
    execution device (where latents and noise are made)."""
    offload = ModelOffload(device)
    unet_group = [pipe.unet] + ([pipe.motion_modules] if pipe.motion_modules is not None else [])
    offload.add(unet_group, [pipe.unet])
    for encoder in pipe.text_encoders:
        offload.add([encoder], [encoder])
    vae = pipe.vae
    offload.add([vae], [vae.encoder, vae.decoder, vae.quant_conv, vae.post_quant_conv])
    pipe.device = offload.device
    return offload
