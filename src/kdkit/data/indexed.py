"""``IndexedDataset``: yields ``(x, y, index)`` so per-sample teacher outputs can be cached."""

from __future__ import annotations

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


class IndexedDataset(Dataset):
    """Wrap a ``(x, y)`` dataset so item ``i`` is ``(x, y, i)``.

    ``hide_labels`` (bool ``[len(dataset)]``): where True, ``y`` is replaced by ``-1``
    (unlabeled transfer-set samples; losses that use labels must ignore ``-1``).
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
        if self.hide_labels is not None and bool(self.hide_labels[index]):
            y = UNLABELED
        return x, int(y), index

    @property
    def num_labeled(self) -> int:
        if self.hide_labels is None:
            return len(self)
        return int((~self.hide_labels).sum())
