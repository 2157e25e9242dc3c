"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016) as in RepDistiller's ``models/wrn.py``.

WRN-d-k: a 3x3 stem with 16 channels, three groups of ``(d - 4) / 6`` pre-activation blocks
with 16k, 32k, 64k channels (strides 1, 2, 2), BN-ReLU, global average pooling, linear head.

Feature points: ``block1`` (32x32 on CIFAR), ``block2`` (16x16), ``block3`` (8x8; note the
group outputs are pre-activation — the final ``bn1`` + ReLU comes after ``block3``); ``fc``.
Parameter counts with 100 classes: wrn_16_2 0.70M, wrn_40_2 2.26M.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdkit.models.init import he_init
from kdkit.models.registry import register_model


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # When widths differ the shortcut also sees the pre-activated input (as in the reference).
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return residual + self.conv2(out)


class WideResNet(nn.Module):
    feature_paths = ("block1", "block2", "block3")

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = self._group(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = self._group(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = self._group(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        he_init(self, zero_linear_bias=True)

    @staticmethod
    def _group(n: int, cin: int, cout: int, stride: int, drop_rate: float) -> nn.Sequential:
        return nn.Sequential(
            *[
                WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(16, 1, num_classes, in_channels, drop_rate)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_channels, drop_rate)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(40, 1, num_classes, in_channels, drop_rate)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_channels, drop_rate)
