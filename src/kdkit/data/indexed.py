"""``IndexedDataset``: yields ``(x, y, index)`` so per-sample teacher outputs can be cached."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.batch import UNLABELED

__all__ = ["UNLABELED", "IndexedDataset", "unlabeled_mask"]


def unlabeled_mask(n: int, labeled_fraction: float, seed: int = 0) -> torch.Tensor:
    """Bool ``[n]``, True where the label is hidden; ``round(n * fraction)`` (>= 1) stay labeled."""
    keep = max(1, round(n * labeled_fraction))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    mask = torch.ones(n, dtype=torch.bool)
    mask[order[:keep]] = False
    return mask


def _filled(y: Any, value: int) -> Any:
    """``y`` (a tensor, an array or a sequence) with every entry set to ``value``."""
    if isinstance(y, torch.Tensor):
        return torch.full_like(y, value)
    if isinstance(y, np.ndarray):
        return np.full_like(y, value)
    return type(y)([value] * len(y))


class IndexedDataset(Dataset):
    """Wrap a ``(x, y)`` dataset so item ``i`` is ``(x, y, i)``.

    A scalar label (a Python or NumPy integer, or a 0-d tensor) becomes a Python ``int``, so
    a batch of labels collates to int64; a label with dimensions (per-token labels ``[L]``,
    multi-label targets) is passed through unchanged.

    ``hide_labels`` (bool ``[len(dataset)]``): where True, ``y`` is replaced by ``-1``
    (unlabeled transfer-set samples; losses that use labels must ignore ``-1``); a label with
    dimensions is filled with ``-1`` instead, keeping its shape and type.
    """

    def __init__(self, dataset: Dataset, hide_labels: torch.Tensor | None = None) -> None:
        if isinstance(dataset, IndexedDataset):
            raise TypeError("dataset is already an IndexedDataset; wrap the plain dataset once")
        n = len(dataset)  # type: ignore[arg-type]
        if hide_labels is not None and hide_labels.shape != (n,):
            raise ValueError(
                f"hide_labels must have shape ({n},) to match the dataset, "
                f"got {tuple(hide_labels.shape)}"
            )
        self.dataset = dataset
        self.hide_labels = hide_labels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.dataset[index][:2]
        scalar = np.ndim(y) == 0
        if self.hide_labels is not None and bool(self.hide_labels[index]):
            y = UNLABELED if scalar else _filled(y, UNLABELED)
        return x, int(y) if scalar else y, index

    @property
    def num_labeled(self) -> int:
        if self.hide_labels is None:
            return len(self)
        return int((~self.hide_labels).sum())
