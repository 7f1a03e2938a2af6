"""Trainable low-rank updates on attention projections, saved in the AnimateDiff attention-processor layout.

Each target ``nn.Linear`` keeps its frozen weight; a forward hook adds ``up(down(x))`` (``up`` starts at zero, so
training starts from the base model). The file layout is what ``vidsynth.lora`` and AnimateDiff's loader read:
``<attention path>.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight``, down [r, in], up [out, r], applied as
``W += alpha * up @ down``.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..lora import unet_name_map
from ..models.layers import Attention

PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}  # module -> file name


class LowRank(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.down = nn.Linear(linear.in_features, rank, bias=False)
        self.up = nn.Linear(rank, linear.out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)  # as diffusers' LoRALinearLayer
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


class LowRankSet(nn.Module):
    """Low-rank updates on the q/k/v/out projections of ``attentions`` (module path in ``model`` -> file path)."""

    def __init__(self, model: nn.Module, attentions: dict[str, str], rank: int):
        super().__init__()
        self.file_names: list[str] = []
        self.layers = nn.ModuleList()
        self._handles = []
        for path, file_path in attentions.items():
            for proj, file_proj in PROJECTIONS.items():
                linear = model.get_submodule(f"{path}.{proj}")
                layer = LowRank(linear, rank).to(linear.weight.device)
                self.layers.append(layer)
                self.file_names.append(f"{file_path}.processor.{file_proj}_lora")
                self._handles.append(linear.register_forward_hook(_adder(layer)))

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """The updates in the AnimateDiff file layout (float32, on the CPU)."""
        state = {}
        for name, layer in zip(self.file_names, self.layers):
            state[f"{name}.down.weight"] = layer.down.weight.detach().float().cpu().clone()
            state[f"{name}.up.weight"] = layer.up.weight.detach().float().cpu().clone()
        return state

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _adder(layer: LowRank):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + layer(args[0])
    return hook


def domain_adapter_targets(unet: nn.Module) -> dict[str, str]:
    """Spatial self- and cross-attention of every transformer block: LDM path -> diffusers path (the file's)."""
    ldm_to_diffusers = {ldm: name for name, ldm in unet_name_map(unet).items() if name != ldm}
    targets = {}
    for path, module in unet.named_modules():
        if isinstance(module, Attention) and re.search(r"\.transformer_blocks\.\d+\.attn[12]$", path):
            targets[path] = ldm_to_diffusers[f"{path}.to_q"].removesuffix(".to_q")
    return targets


def motion_lora_targets(motion: nn.Module) -> dict[str, str]:
    """The two temporal attention blocks of every motion module (the file uses the module's own paths)."""
    return {path: path for path, module in motion.named_modules()
            if isinstance(module, Attention) and re.search(r"\.attention_blocks\.\d+$", path)}
