"""VGG with BatchNorm for CIFAR, as RepDistiller's ``models/vgg.py`` (``vgg8_bn``/``vgg13_bn``).

Five conv blocks (3x3 convs, BN, ReLU), max-pooling between blocks 0-1, 1-2 and 2-3 (and 3-4
only for 64x64 inputs), global average pooling, one linear layer (no FC stack). The registry
names ``vgg8`` and ``vgg13`` are the BN variants used in the KD tables.

Feature points: ``block0`` .. ``block4``. Each block ends with its last BatchNorm (the ReLU is
applied in ``forward``), so a hook on ``blockN`` sees pre-activation features — the form OFD
and CRD use. ``classifier`` is the head. Parameter counts with 100 classes: vgg8 3.96M,
vgg13 9.46M.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kdkit.models.init import he_init
from kdkit.models.registry import register_model

_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


def _make_block(widths: Sequence[int], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in widths:
        layers.append(nn.Conv2d(in_channels, v, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    # The block's final ReLU is applied in forward so the block output stays pre-activation.
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    feature_paths = ("block1", "block2", "block3", "block4")

    def __init__(
        self,
        cfg: Sequence[Sequence[int]],
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.block0 = _make_block(cfg[0], in_channels, batch_norm)
        self.block1 = _make_block(cfg[1], cfg[0][-1], batch_norm)
        self.block2 = _make_block(cfg[2], cfg[1][-1], batch_norm)
        self.block3 = _make_block(cfg[3], cfg[2][-1], batch_norm)
        self.block4 = _make_block(cfg[4], cfg[3][-1], batch_norm)
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)

        he_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = F.relu(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


@register_model("vgg8")
def vgg8(num_classes: int, in_channels: int = 3, batch_norm: bool = True) -> VGG:
    return VGG(_CFG["vgg8"], num_classes, in_channels, batch_norm)


@register_model("vgg11")
def vgg11(num_classes: int, in_channels: int = 3, batch_norm: bool = True) -> VGG:
    return VGG(_CFG["vgg11"], num_classes, in_channels, batch_norm)


@register_model("vgg13")
def vgg13(num_classes: int, in_channels: int = 3, batch_norm: bool = True) -> VGG:
    return VGG(_CFG["vgg13"], num_classes, in_channels, batch_norm)


@register_model("vgg16")
def vgg16(num_classes: int, in_channels: int = 3, batch_norm: bool = True) -> VGG:
    return VGG(_CFG["vgg16"], num_classes, in_channels, batch_norm)
