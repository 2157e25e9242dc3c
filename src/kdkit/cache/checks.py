"""Checks that a dataset can be cached: samples carry their index, and views are replayable."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdkit.cache.fingerprint import _probe_indices, _sample_hash
from kdkit.cache.views import _at_view, _find_seeded_views

_WRAP_HINT = "wrap it: `kdkit.data.IndexedDataset(dataset)`"


def _index_of(item: Any) -> int | None:
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        return None
    idx = item[2]
    if isinstance(idx, Tensor):
        if idx.numel() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            return None
        return int(idx.item())
    if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
        return int(idx)
    return None


def _check_indexed(dataset: Dataset, n: int) -> None:
    for i in _probe_indices(n):
        item = dataset[i]
        got = _index_of(item)
        if got != i:
            shape = (
                f"a tuple of {len(item)} items"
                if isinstance(item, (tuple, list))
                else type(item).__name__
            )
            detail = f"index {got}" if got is not None else shape
            raise ValueError(
                f"TeacherCache: dataset[{i}] returned {detail}, but the cache needs each sample "
                f"as (x, y, index) with index == {i} so that teacher outputs are stored and read "
                f"by sample index; {_WRAP_HINT}"
            )


def _check_replayable(dataset: Dataset, n: int, epochs: int) -> None:
    views = _find_seeded_views(dataset)
    if views is not None and views.num_views != epochs:
        raise ValueError(
            f"TeacherCache: SeededViews.num_views is {views.num_views!r} but epochs={epochs}; "
            f"they must be equal so that training epoch e replays cached view e % {epochs}. "
            f"Create it as SeededViews(dataset, transform, seed, num_views={epochs})"
        )
    if epochs > 1 and views is None:
        raise ValueError(
            f"TeacherCache: epochs={epochs} stores {epochs} augmented views per sample, which "
            "needs a dataset that can replay them; wrap it in "
            f"`kdkit.cache.SeededViews(dataset, transform, seed, num_views={epochs})`, or use "
            "epochs=1 for a deterministic dataset"
        )
    with _at_view(dataset, 0):
        for i in _probe_indices(n):
            if _sample_hash(dataset[i]) != _sample_hash(dataset[i]):
                where = (
                    " inside SeededViews (the base dataset or transform uses an RNG that is not "
                    "torch's, Python's or NumPy's global one)"
                    if views is not None
                    else ""
                )
                raise ValueError(
                    f"TeacherCache: dataset[{i}] returned different inputs on two reads{where}: "
                    "it applies random augmentation that the cache cannot replay, so a cached "
                    "teacher output would be paired with a different view. Move the random "
                    "transform into `kdkit.cache.SeededViews(dataset, transform, seed, "
                    "num_views=epochs)` (the student then sees the view the teacher saw), or "
                    "train with the online teacher (no cache)"
                )
