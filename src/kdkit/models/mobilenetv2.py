"""MobileNetV2 for CIFAR as RepDistiller's ``models/mobilenetv2.py`` (``mobile_half``).

``mobilenetv2`` is the KD-table student "MobileNetV2": expansion 6, width multiplier 0.5,
a stride-2 3x3 stem, seven stages of inverted residual blocks (strides 1,1,2,2,1,2,1), a 1x1
conv to 1280 channels, global average pooling and a linear head. Unlike torchvision's
version, the first stage (expansion 1) keeps its 1x1 expansion conv, as in the reference.

Feature points: ``blocks.1`` (16x16 on CIFAR), ``blocks.2`` (8x8), ``blocks.4`` (4x4),
``blocks.6`` (2x2) — the four points RepDistiller uses — and ``conv2``; ``classifier`` is the
head. Parameter count with 100 classes: 0.81M.
"""

from __future__ import annotations

import torch
from torch import nn

from kdkit.models.init import he_init
from kdkit.models.registry import register_model


def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    feature_paths = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")

    def __init__(
        self,
        num_classes: int = 100,
        in_channels: int = 3,
        expansion: int = 6,
        width_mult: float = 0.5,
    ) -> None:
        super().__init__()
        setting = [  # (expansion, channels, repeats, stride)
            (1, 16, 1, 1),
            (expansion, 24, 2, 1),
            (expansion, 32, 3, 2),
            (expansion, 64, 4, 2),
            (expansion, 96, 3, 1),
            (expansion, 160, 3, 2),
            (expansion, 320, 1, 1),
        ]
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            out = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn(channels, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        he_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register_model("mobilenetv2")
def mobilenetv2(
    num_classes: int, in_channels: int = 3, expansion: int = 6, width_mult: float = 0.5
) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, expansion, width_mult)


@register_model("mobile_half")
def mobile_half(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """RepDistiller's name for :func:`mobilenetv2` with its defaults."""
    return MobileNetV2(num_classes, in_channels, 6, 0.5)
