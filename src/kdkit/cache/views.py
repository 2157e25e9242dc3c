"""Replayable augmentation: :class:`SeededViews` and the dataset wrapper chain it sits in.

A cached teacher output is only valid for the exact view the teacher saw; ``SeededViews`` makes
every view a pure function of ``(seed, view, index)`` so training can replay it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SeededViews"]


class SeededViews(Dataset):
    """Apply ``transform`` under an RNG seeded from ``(seed, view, index)``: a replayable view.

    ``dataset[index]`` must return ``(x, y, ...)``; this yields ``(transform(x), y, index)``, so it
    also serves as the indexed dataset the cache needs. The base read and the transform run
    under ``torch.random.fork_rng`` with ``torch.manual_seed(s)`` (Python's ``random`` and
    NumPy's global RNG are seeded with ``s`` too and restored afterwards), where ``s`` depends
    only on ``(seed, view, index)`` and ``view = epoch % num_views``. The student therefore sees,
    at any epoch, exactly the view the teacher saw when the cache was built — in any process,
    any DataLoader worker and any order.

    Use the same ``transform``, ``seed`` and ``num_views`` (= the cache's ``epochs``) for the
    build and for training, or get the training wrapper from :meth:`TeacherCache.seeded_views`.
    ``num_views=None`` means every epoch is a fresh view (not cacheable beyond one epoch).
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[[Any], Any] | None = None,
        seed: int = 0,
        num_views: int | None = None,
    ) -> None:
        if num_views is not None and (not isinstance(num_views, int) or num_views < 1):
            raise ValueError(
                f"SeededViews num_views must be a positive int or None, got {num_views!r}; "
                "pass the cache's `epochs`"
            )
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.num_views = num_views
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the view ``__getitem__`` serves; call once per epoch like DistributedSampler."""
        self.epoch = int(epoch)

    @property
    def view(self) -> int:
        return self.epoch % self.num_views if self.num_views else self.epoch

    def view_seed(self, index: int, view: int | None = None) -> int:
        """The 63-bit seed of sample ``index`` in ``view`` (default: the current view)."""
        view = self.view if view is None else view
        digest = hashlib.sha256(f"kdkit-view:{self.seed}:{view}:{int(index)}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        index = int(index)
        seed = self.view_seed(index)
        py_state = random.getstate()
        np_state = np.random.get_state()
        try:
            # devices=[] keeps CUDA RNGs untouched: transforms run on CPU in dataset code.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (2**32))
                item = self.dataset[index]
                if not isinstance(item, (tuple, list)) or len(item) < 2:
                    raise TypeError(
                        f"SeededViews: dataset[{index}] returned {type(item).__name__}; "
                        "expected a tuple (x, y, ...)"
                    )
                x, y = item[0], item[1]
                if self.transform is not None:
                    x = self.transform(x)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return x, y, index

    def __repr__(self) -> str:
        return (
            f"SeededViews(seed={self.seed}, num_views={self.num_views}, "
            f"transform={self.transform!r})"
        )


def _wrapper_chain(dataset: Any) -> Iterator[Any]:
    """``dataset``, then each ``.dataset`` it wraps (at most 16 levels, stops at a cycle)."""
    obj = dataset
    for _ in range(16):
        yield obj
        inner = getattr(obj, "dataset", None)
        if inner is None or inner is obj:
            return
        obj = inner


class _at_view:
    """Temporarily put a SeededViews (anywhere in the wrapper chain) on ``view``."""

    def __init__(self, dataset: Any, view: int) -> None:
        self.views = [obj for obj in _wrapper_chain(dataset) if isinstance(obj, SeededViews)]
        self.view = view
        self.saved: list[int] = []

    def __enter__(self) -> _at_view:
        self.saved = [v.epoch for v in self.views]
        for v in self.views:
            v.set_epoch(self.view)
        return self

    def __exit__(self, *exc: object) -> None:
        for v, epoch in zip(self.views, self.saved, strict=True):
            v.set_epoch(epoch)


def _find_seeded_views(dataset: Any) -> SeededViews | None:
    return next((obj for obj in _wrapper_chain(dataset) if isinstance(obj, SeededViews)), None)
