"""``synthetic``: fixed-seed Gaussian clusters, a learnable classification set for tests.

Class ``k`` has a random mean image ``mu_k`` (unit-norm direction scaled by ``separation``);
a sample is ``mu_k + noise * N(0, I)``, reshaped to ``input_shape``. Train/val/test are drawn
from the same generator (``seed``), so a linear model separates them for the default sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset

from kdkit.data.registry import DatasetMeta, DataSplits, register_dataset


class _Tensors(TensorDataset):
    @property
    def targets(self) -> list[int]:
        return self.tensors[1].tolist()


def _meta(num_classes: int = 4, input_shape: Sequence[int] = (1, 8, 8), **_options) -> DatasetMeta:
    return DatasetMeta(int(num_classes), tuple(int(s) for s in input_shape))  # type: ignore[arg-type]


@register_dataset("synthetic", meta=_meta)
def build_synthetic(
    num_classes: int = 4,
    input_shape: Sequence[int] = (1, 8, 8),
    size: int = 512,
    val_size: int = 128,
    test_size: int = 128,
    separation: float = 4.0,
    noise: float = 1.0,
    seed: int = 0,
) -> DataSplits:
    if num_classes < 2:
        raise ValueError(f"synthetic num_classes must be >= 2, got {num_classes}")
    if len(input_shape) != 3:
        raise ValueError(f"synthetic input_shape must be (C, H, W), got {tuple(input_shape)}")
    shape = tuple(int(s) for s in input_shape)
    dim = shape[0] * shape[1] * shape[2]
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=g)
    means = separation * means / means.norm(dim=1, keepdim=True)

    def draw(n: int) -> _Tensors:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = means[y] + noise * torch.randn(n, dim, generator=g)
        return _Tensors(x.reshape(n, *shape), y)

    return DataSplits(
        train=draw(size),
        val=draw(val_size),
        test=draw(test_size),
        num_classes=num_classes,
        input_shape=shape,  # type: ignore[arg-type]
        class_names=[f"class_{k}" for k in range(num_classes)],
    )
