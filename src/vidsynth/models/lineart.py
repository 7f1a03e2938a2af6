"""The lineart annotator's generator (``models/Annotators/sk_model.pth``, lllyasviel's Annotators; the
"informative drawings" network of ControlNet 1.1's ``annotator/lineart``): RGB in [0, 1] -> line map in [0, 1].

Keys load as they are: ``model0`` (reflection pad, 7x7 conv), ``model1`` (two stride-2 convs), ``model2`` (residual
blocks), ``model3`` (two stride-2 transposed convs), ``model4`` (7x7 conv, sigmoid); InstanceNorm without affine
parameters after every conv but the last. Widths and the number of residual blocks are read off the shapes.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vidsynth.errors import CheckpointError


@dataclass(frozen=True)
class LineartConfig:
    in_channels: int = 3
    out_channels: int = 1
    width: int = 64          # model0's output; model1 doubles it twice
    residual_blocks: int = 3

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]]) -> LineartConfig:
        required = ("model0.1.weight", "model4.1.weight")
        if any(k not in shapes for k in required):
            raise CheckpointError(f"not a lineart annotator (sk_model.pth) state dict: needs {', '.join(required)}")
        blocks = {int(m[1]) for k in shapes if (m := re.match(r"model2\.(\d+)\.", k))}
        width, c_in = shapes["model0.1.weight"][:2]
        return cls(c_in, shapes["model4.1.weight"][0], width, len(blocks))


def _conv_norm_relu(conv: nn.Module, channels: int, pad: int = 0) -> list[nn.Module]:
    return ([nn.ReflectionPad2d(pad)] if pad else []) + [conv, nn.InstanceNorm2d(channels), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        conv = lambda: nn.Conv2d(channels, channels, 3)  # noqa: E731
        self.conv_block = nn.Sequential(*_conv_norm_relu(conv(), channels, 1),
                                        nn.ReflectionPad2d(1), conv(), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    def __init__(self, config: LineartConfig = LineartConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.model0 = nn.Sequential(*_conv_norm_relu(nn.Conv2d(config.in_channels, w, 7), w, 3))
        self.model1 = nn.Sequential(*_conv_norm_relu(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), 2 * w),
                                    *_conv_norm_relu(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), 4 * w))
        self.model2 = nn.Sequential(*(ResidualBlock(4 * w) for _ in range(config.residual_blocks)))
        up = lambda c_in, c_out: nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)  # noqa: E731
        self.model3 = nn.Sequential(*_conv_norm_relu(up(4 * w, 2 * w), 2 * w), *_conv_norm_relu(up(2 * w, w), w))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(w, config.out_channels, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (b, 3, h, w) in [0, 1] -> (b, 1, h, w) in [0, 1] (1 = paper, 0 = line)."""
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))
