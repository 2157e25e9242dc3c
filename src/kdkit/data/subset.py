"""A subset of a base dataset with its own transform (train and val carved from one file set)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.utils.data import Dataset


class TransformedSubset(Dataset):
    """Items ``indices[i]`` of ``base`` (which returns untransformed ``(x, y)``), transformed."""

    def __init__(
        self, base: Dataset, indices: Sequence[int], transform: Callable | None = None
    ) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        x, y = self.base[self.indices[index]]
        if self.transform is not None:
            x = self.transform(x)
        return x, y

    @property
    def targets(self) -> list[int]:
        base_targets = self.base.targets  # type: ignore[attr-defined]
        return [int(base_targets[i]) for i in self.indices]
