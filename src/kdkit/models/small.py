"""Small models for quick runs and tests: an MLP and a three-block CNN.

Feature points (dotted paths for :class:`kdkit.capture.FeatureCapture`):

* ``mlp``: ``hidden.0``, ``hidden.1``, ... (one per hidden layer, output after ReLU) and ``fc``.
* ``small_cnn``: ``block1`` (full resolution), ``block2`` (1/2), ``block3`` (1/4), ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdkit.models.registry import register_model


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU (-> Dropout)] * len(hidden_sizes) -> Linear."""

    feature_paths: tuple[str, ...] = ()

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"mlp dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        width = input_size
        for size in hidden_sizes:
            block: list[nn.Module] = [nn.Linear(width, int(size)), nn.ReLU(inplace=True)]
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            layers.append(nn.Sequential(*block))
            width = int(size)
        self.input_size = input_size
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.feature_paths = tuple(f"hidden.{i}" for i in range(len(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        if x.shape[1] != self.input_size:
            raise ValueError(
                f"mlp was built for inputs of {self.input_size} values per sample but got "
                f"{x.shape[1]} (input shape {tuple(x.shape)}); pass the data's in_channels and "
                "image_size to create_model"
            )
        return self.fc(self.hidden(x))


@register_model("mlp")
def mlp(
    num_classes: int,
    in_channels: int = 3,
    image_size: int | Sequence[int] | None = None,
    hidden_sizes: Sequence[int] = (256, 128),
    dropout: float = 0.0,
) -> MLP:
    """MLP on flattened images; ``image_size`` (int or (H, W)) fixes the input width."""
    if image_size is None:
        raise ValueError(
            "model 'mlp' needs image_size to size its first layer "
            "(in_channels * H * W inputs); e.g. create_model('mlp', 10, in_channels=1, "
            "image_size=8) for the digits data"
        )
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return MLP(in_channels * int(h) * int(w), num_classes, hidden_sizes, dropout)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """conv(w) -> conv(2w, /2) -> conv(4w, /2) -> global average pool -> linear.

    Any input size >= 4 px works (8x8 digits, 32x32 CIFAR).
    """

    feature_paths = ("block1", "block2", "block3")

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.block1 = _conv_bn_relu(in_channels, width, 1)
        self.block2 = _conv_bn_relu(width, 2 * width, 2)
        self.block3 = _conv_bn_relu(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 3, width: int = 32) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width)
