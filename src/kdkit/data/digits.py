"""``digits``: scikit-learn's embedded 8x8 handwritten digits (1,797 real images, no download).

Images are float tensors ``[1, 8, 8]`` in [0, 1] (raw pixels are 0..16). The train/val/test
split is fixed — stratified 60/20/20 with ``split_seed`` (default 0), independent of the run
seed — so every run is compared on the same test set: 1,077 / 360 / 360 images.
``augment=True`` shifts training images by up to one pixel (zero padding + random 8x8 crop).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F
from torch.utils.data import Dataset

from kdkit.data.registry import DataSplits, register_dataset


class DigitsDataset(Dataset):
    """In-memory ``(image [1, 8, 8], label)`` pairs with optional 1-pixel random shifts."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, augment: bool = False):
        self.images = images
        self.targets = targets
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        if self.augment:
            padded = F.pad(x, (1, 1, 1, 1))
            dy, dx = torch.randint(0, 3, (2,)).tolist()
            x = padded[:, dy : dy + 8, dx : dx + 8]
        return x, int(self.targets[index])


def digits_split_indices(split_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices into ``load_digits()`` of the fixed stratified 60/20/20 train/val/test split."""
    y = load_digits().target
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=split_seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=y[rest], random_state=split_seed)
    return np.sort(train), np.sort(val), np.sort(test)


@register_dataset("digits", num_classes=10, input_shape=(1, 8, 8))
def build_digits(augment: bool = False, split_seed: int = 0) -> DataSplits:
    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.tensor(raw.target, dtype=torch.long)
    train, val, test = (torch.as_tensor(i) for i in digits_split_indices(split_seed))
    return DataSplits(
        train=DigitsDataset(images[train], targets[train], augment=augment),
        val=DigitsDataset(images[val], targets[val]),
        test=DigitsDataset(images[test], targets[test]),
        num_classes=10,
        input_shape=(1, 8, 8),
        class_names=[str(i) for i in range(10)],
    )
