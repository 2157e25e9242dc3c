"""Fingerprints of what a teacher cache was built from: teacher weights, dataset, transform.

A cache is only valid for all three; :meth:`kdkit.cache.TeacherCache.open` compares them.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdkit.cache.views import SeededViews, _at_view, _wrapper_chain

__all__ = ["fingerprint_dataset", "fingerprint_teacher"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _hash_update(h: Any, obj: Any) -> None:
    """Feed ``obj`` (tensors, arrays, images, numbers, strings, nested containers) into ``h``."""
    if isinstance(obj, Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(b"D")
        for key in sorted(obj, key=str):
            h.update(str(key).encode())
            _hash_update(h, obj[key])
    elif isinstance(obj, (tuple, list)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _hash_update(h, item)
    elif isinstance(obj, (int, float, str, bool, bytes)) or obj is None:
        h.update(repr(obj).encode())
    elif hasattr(obj, "tobytes") and hasattr(obj, "size") and hasattr(obj, "mode"):
        h.update(f"I{obj.mode}{obj.size}".encode())  # PIL image
        h.update(obj.tobytes())
    else:
        h.update(_ADDRESS.sub("", repr(obj)).encode())


def fingerprint_teacher(teacher: nn.Module) -> str:
    """sha256 over the teacher's ``state_dict`` (names, dtypes, shapes, bytes), sorted by name."""
    h = hashlib.sha256()
    state = teacher.state_dict()
    for name in sorted(state):
        value = state[name]
        h.update(name.encode())
        _hash_update(h, value)
    return h.hexdigest()


_PROBES = 16


def _probe_indices(n: int) -> list[int]:
    """16 evenly spaced indices, first and last included (all of them for small sets)."""
    if n <= _PROBES:
        return list(range(n))
    return sorted({round(i * (n - 1) / (_PROBES - 1)) for i in range(_PROBES)})


def _sample_hash(item: Any) -> str:
    """sha256 of a sample's input ``x`` (item 0 of ``(x, y, index)``): what the teacher reads.

    The label is left out: it does not change the teacher's output, so a cache stays valid
    when labels are hidden (``data.labeled_fraction``) or relabelled.
    """
    h = hashlib.sha256()
    _hash_update(h, item[0] if isinstance(item, (tuple, list)) else item)
    return h.hexdigest()


def fingerprint_dataset(dataset: Dataset) -> str:
    """sha256 of class name, length and 16 evenly spaced samples' inputs ``x`` (all if fewer).

    A probe, not a full hash: reading the whole data set on every open would cost a data pass.
    Labels are not part of it (see :func:`_sample_hash`).

    A :class:`SeededViews` is read at view 0, so its (random) augmentation is replayed exactly.
    """
    h = hashlib.sha256()
    n = len(dataset)  # type: ignore[arg-type]
    h.update(f"{_dataset_name(dataset)}:{n}".encode())
    with _at_view(dataset, 0):
        for i in _probe_indices(n):
            h.update(_sample_hash(dataset[i]).encode())
    return h.hexdigest()


def _dataset_name(dataset: Any) -> str:
    return "/".join(type(obj).__name__ for obj in _wrapper_chain(dataset))


def _transform_identity(dataset: Any, transform_id: str | None) -> str:
    """``transform_id`` if given, else the reprs of every ``transform`` along the wrapper chain."""
    if transform_id is not None:
        return f"id:{transform_id}"
    parts = []
    for obj in _wrapper_chain(dataset):
        if isinstance(obj, SeededViews):
            parts.append(f"SeededViews(seed={obj.seed}, num_views={obj.num_views})")
        for attr in ("transform", "target_transform", "transforms"):
            value = getattr(obj, attr, None)
            if value is not None and not isinstance(value, (Tensor, np.ndarray)):
                parts.append(f"{attr}={value!r}")
    text = "; ".join(parts) or "none"
    stable = _ADDRESS.sub("", text)
    if stable != text:
        warnings.warn(
            "TeacherCache: the dataset's transform repr contains memory addresses (a lambda or "
            "an object without __repr__), so it cannot identify the transform; pass an explicit "
            "`transform_id=` to TeacherCache.build and TeacherCache.open",
            stacklevel=3,
        )
    return "repr:" + stable


def _fingerprint(teacher: nn.Module, dataset: Dataset, transform_id: str | None) -> dict:
    return {
        "teacher": fingerprint_teacher(teacher),
        "dataset": fingerprint_dataset(dataset),
        "transform": hashlib.sha256(
            _transform_identity(dataset, transform_id).encode()
        ).hexdigest(),
    }
