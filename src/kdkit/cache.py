"""Teacher outputs computed once, stored memory-mapped, fingerprinted, and read back by index.

Layout of a cache directory ``path``::

    path/meta.json          shapes, dtypes, top_k, fingerprint, sha256 per array, samples done
    path/logits.npy         dense: [K, N, *S] float32 (or float16); S = per-sample logits shape
    path/topk_logp.npy      top-k: [K, N, *S[:-1], k] log-probabilities (float16 by default)
    path/topk_index.npy            [K, N, *S[:-1], k] class indices (int16 if C < 2**15, else int32)
    path/topk_tail.npy             [K, N, *S[:-1]]    tail mass 1 - sum(top-k probs), float32
    path/feat_000.npy       one array per cached feature path, [K, N, *F]

K is the number of augmented views (``epochs``), N the number of samples, classes are on the
last dim of the logits (so [B, C] classifier logits and [B, L, V] token logits both work).
Each output is ONE contiguous ``.npy`` file opened with ``numpy.load(mmap_mode="r")``; a read
of a batch of indices touches only those rows. Under DDP each rank therefore reads only the
pages of its own samples: open the same cache on every rank (read-only, no locking needed) and
call ``teacher_output(index)`` with the indices of the rank's batch. Build it on one rank only.

A cache is only valid for the teacher weights, the data and the transform it was built from:
``meta.json`` holds a fingerprint of each, and :meth:`TeacherCache.open` refuses a mismatch and
names which part differs. With random augmentation the cache only works through
:class:`SeededViews`, which replays the exact view the teacher saw.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["SeededViews", "TeacherCache", "fingerprint_dataset", "fingerprint_teacher"]

FORMAT_VERSION = 1
_META = "meta.json"
_PARTIAL_META = "meta.json.partial"
_REBUILD_HINT = "rebuild it with `kdkit.cache.TeacherCache.build(...)` or `kdkit cache`"
_WRAP_HINT = "wrap it: `kdkit.data.IndexedDataset(dataset)`"
_DTYPES = {torch.float32: "float32", torch.float16: "float16"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# --------------------------------------------------------------------------------------------
# Seeded, replayable augmentation
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


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


def _probe_indices(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1}) if n > 0 else []


def _sample_hash(item: Any) -> str:
    h = hashlib.sha256()
    _hash_update(h, item[:2] if isinstance(item, (tuple, list)) else item)
    return h.hexdigest()


def fingerprint_dataset(dataset: Dataset) -> str:
    """sha256 of class name, length and the first/middle/last samples' ``(x, y)``.

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
    names = []
    for _ in range(16):
        names.append(type(dataset).__name__)
        inner = getattr(dataset, "dataset", None)
        if inner is None or inner is dataset:
            break
        dataset = inner
    return "/".join(names)


def _transform_identity(dataset: Any, transform_id: str | None) -> str:
    """``transform_id`` if given, else the reprs of every ``transform`` along the wrapper chain."""
    if transform_id is not None:
        return f"id:{transform_id}"
    parts = []
    obj = dataset
    for _ in range(16):
        if isinstance(obj, SeededViews):
            parts.append(f"SeededViews(seed={obj.seed}, num_views={obj.num_views})")
        for attr in ("transform", "target_transform", "transforms"):
            value = getattr(obj, attr, None)
            if value is not None and not isinstance(value, (Tensor, np.ndarray)):
                parts.append(f"{attr}={value!r}")
        inner = getattr(obj, "dataset", None)
        if inner is None or inner is obj:
            break
        obj = inner
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


class _at_view:
    """Temporarily put a SeededViews (anywhere in the wrapper chain) on ``view``."""

    def __init__(self, dataset: Any, view: int) -> None:
        self.views = []
        obj = dataset
        for _ in range(16):
            if isinstance(obj, SeededViews):
                self.views.append(obj)
            inner = getattr(obj, "dataset", None)
            if inner is None or inner is obj:
                break
            obj = inner
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
    obj = dataset
    for _ in range(16):
        if isinstance(obj, SeededViews):
            return obj
        inner = getattr(obj, "dataset", None)
        if inner is None or inner is obj:
            return None
        obj = inner
    return None


# --------------------------------------------------------------------------------------------
# Dataset checks
# --------------------------------------------------------------------------------------------


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
                    "inside SeededViews (the base dataset or transform uses an RNG that is not "
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


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _default_logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        if "logits" in output:
            return output["logits"]
        return next(iter(output.values()))
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"TeacherCache: cannot find logits in a teacher output of type {type(output).__name__}; "
        "accepted: Tensor, tuple/list (element 0), dict or object with 'logits'; or pass "
        "`logits=callable(output) -> Tensor` to TeacherCache.build"
    )


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k log-probabilities, their class indices and the tail mass, over the last dim.

    ``logp = log_softmax(z)``; ``values, index = topk(logp, k)``;
    ``tail = sum_{c not in top-k} p_c`` (computed as exp(logsumexp) of the rest, which keeps
    its precision when the tail is tiny, instead of 1 - sum(top-k probs)). tail = 0 when k = C.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, index = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, index, float("-inf"))
    tail = rest.logsumexp(dim=-1).exp() if k < logits.shape[-1] else torch.zeros_like(logp[..., 0])
    return values, index, tail


def topk_reconstruct(values: Tensor, index: Tensor, tail: Tensor, num_classes: int) -> Tensor:
    """Teacher logits from top-k: ``z_c = log p_c`` at the top-k classes and
    ``z_c = log(tail / (C - k))`` for each of the other C - k classes.

    ``softmax(z)`` equals the teacher's probabilities at the top-k classes and spreads the tail
    mass evenly over the rest; it is exact (up to the storage dtype) when k = C. The tail is
    clamped to the smallest normal float32 so that z stays finite (losses with -inf teacher
    logits give NaN).
    """
    values = values.float()
    k = values.shape[-1]
    if k == num_classes:
        out = torch.empty(*values.shape[:-1], num_classes, dtype=torch.float32)
    else:
        tiny = torch.finfo(torch.float32).tiny
        fill = torch.log(tail.float().clamp_min(tiny) / (num_classes - k))
        out = fill.unsqueeze(-1).expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, index.long(), values)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class TeacherCache:
    """Teacher outputs for every sample (and every augmented view), read back by sample index.

    Build once with :meth:`build`, reopen with :meth:`open`; then in the training loop::

        out = cache.teacher_output(batch_index, epoch)   # {"logits": [B, C], "features": {...}}

    ``bytes_per_sample`` is the stored payload per sample over all K views (npy headers and
    meta.json excluded): dense float32 costs ``4 * C * K``, top-k costs
    ``K * (k * (2 + 2 or 4) + 4)`` bytes per sample for fp16 values, int16/int32 indices and a
    float32 tail.
    """

    def __init__(self, path: str | os.PathLike, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta
        self._arrays: dict[str, np.ndarray] | None = None

    # ---- public properties ---------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def num_views(self) -> int:
        return int(self.meta["num_views"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["logits_shape"][-1])

    @property
    def top_k(self) -> int | None:
        return self.meta["top_k"]

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def feature_paths(self) -> list[str]:
        return list(self.meta["features"])

    @property
    def fingerprint(self) -> dict:
        return dict(self.meta["fingerprint"])

    @property
    def bytes_per_sample(self) -> int:
        total = 0
        for info in self.meta["arrays"].values():
            shape = info["shape"]
            total += np.dtype(info["dtype"]).itemsize * math.prod(shape[2:]) * shape[0]
        return total

    def __repr__(self) -> str:
        mode = f"top_k={self.top_k}" if self.top_k else "dense"
        return (
            f"TeacherCache({str(self.path)!r}, samples={len(self)}, views={self.num_views}, "
            f"classes={self.num_classes}, {mode}, features={self.feature_paths}, "
            f"bytes_per_sample={self.bytes_per_sample})"
        )

    def __getstate__(self) -> dict:
        # memmaps are reopened lazily in each process (DataLoader workers, DDP ranks).
        return {"path": self.path, "meta": self.meta, "_arrays": None}

    def seeded_views(self, dataset: Dataset, transform: Callable[[Any], Any] | None) -> SeededViews:
        """The training-side :class:`SeededViews` with this cache's seed and number of views."""
        return SeededViews(dataset, transform, seed=self.seed, num_views=self.num_views)

    # ---- reading -------------------------------------------------------------------------

    def _array(self, name: str) -> np.ndarray:
        if self._arrays is None:
            self._arrays = {
                key: np.load(self.path / info["file"], mmap_mode="r")
                for key, info in self.meta["arrays"].items()
            }
        return self._arrays[name]

    def _view_of(self, epoch: int | None) -> int:
        if epoch is None:
            if self.num_views > 1:
                raise ValueError(
                    f"TeacherCache.teacher_output: this cache holds {self.num_views} augmented "
                    "views, so `epoch` is required (the view is epoch % num_views); got None"
                )
            return 0
        return int(epoch) % self.num_views

    def teacher_output(self, index: Tensor | Sequence[int], epoch: int | None = None) -> dict:
        """Stored outputs for samples ``index`` at view ``epoch % num_views``.

        Returns ``{"logits": float32 [B, *S]}`` plus ``"features": {path: float32 tensor}`` when
        features were cached; tensors are on ``index``'s device when it is a tensor.
        """
        device = index.device if isinstance(index, Tensor) else torch.device("cpu")
        idx = index.detach().to("cpu").numpy() if isinstance(index, Tensor) else np.asarray(index)
        if idx.dtype.kind not in "iu":
            raise TypeError(
                f"TeacherCache.teacher_output: index must hold integers, got dtype {idx.dtype}"
            )
        idx = idx.astype(np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise IndexError(
                f"TeacherCache.teacher_output: sample index {bad} out of range [0, {n}); the "
                f"cache was built for a dataset of {n} samples"
            )
        view = self._view_of(epoch)

        def rows(name: str) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(self._array(name)[view, idx]))

        if self.top_k is None:
            logits = rows("logits").float()
        else:
            logits = topk_reconstruct(
                rows("topk_logp"), rows("topk_index"), rows("topk_tail"), self.num_classes
            )
        out: dict[str, Any] = {"logits": logits.to(device)}
        if self.meta["features"]:
            out["features"] = {
                p: rows(name).float().to(device) for p, name in self.meta["features"].items()
            }
        return out

    # ---- opening & verification ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        teacher: nn.Module | None = None,
        dataset: Dataset | None = None,
        transform_id: str | None = None,
        verify: bool = True,
    ) -> TeacherCache:
        """Open a built cache; check it against ``teacher`` / ``dataset`` / ``transform_id``.

        File sizes are always checked; with ``verify=True`` each array's sha256 is recomputed
        and compared with ``meta.json`` (reads every byte once: pass ``verify=False`` to skip
        on trusted storage). Any part given that differs from what the cache was built from
        raises ValueError naming the part (teacher weights / dataset / transform).
        """
        path = Path(path)
        meta_path = path / _META
        if not meta_path.is_file():
            partial = path.parent / f".{path.name}.partial" / _PARTIAL_META
            if partial.is_file():
                done = json.loads(partial.read_text()).get("rows_done", 0)
                raise FileNotFoundError(
                    f"TeacherCache: {path} is not finished (the build stopped after {done} "
                    "rows); call TeacherCache.build again with the same arguments to resume it"
                )
            raise FileNotFoundError(
                f"TeacherCache: no cache at {path} ({meta_path} missing); {_REBUILD_HINT}"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"TeacherCache: {meta_path} is corrupted ({exc}); {_REBUILD_HINT}"
            ) from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"TeacherCache: {meta_path} has format_version {meta.get('format_version')!r}, "
                f"this kdkit reads {FORMAT_VERSION}; {_REBUILD_HINT}"
            )
        cache = cls(path, meta)
        cache._verify_files(checksums=verify)
        cache.check(teacher=teacher, dataset=dataset, transform_id=transform_id)
        return cache

    def _verify_files(self, checksums: bool) -> None:
        for info in self.meta["arrays"].values():
            file = self.path / info["file"]
            if not file.is_file():
                raise ValueError(f"TeacherCache: array file {file} is missing; {_REBUILD_HINT}")
            size = file.stat().st_size
            if size != info["bytes"]:
                raise ValueError(
                    f"TeacherCache: array file {file} has {size} bytes, meta.json records "
                    f"{info['bytes']} (truncated or overwritten); {_REBUILD_HINT}"
                )
            if checksums and _sha256_file(file) != info["sha256"]:
                raise ValueError(
                    f"TeacherCache: array file {file} fails its sha256 checksum (corrupted); "
                    f"{_REBUILD_HINT}"
                )

    def check(
        self,
        *,
        teacher: nn.Module | None = None,
        dataset: Dataset | None = None,
        transform_id: str | None = None,
    ) -> None:
        """Raise ValueError naming every part (teacher weights, dataset, transform) that differs."""
        stored = self.meta["fingerprint"]
        problems = []
        if teacher is not None and fingerprint_teacher(teacher) != stored["teacher"]:
            problems.append(
                "teacher weights differ from the ones the cache was built with (the state_dict "
                "hash does not match)"
            )
        if dataset is not None or transform_id is not None:
            ident = _transform_identity(dataset, transform_id)
            if hashlib.sha256(ident.encode()).hexdigest() != stored["transform"]:
                problems.append(
                    f"transform differs (now {ident[:200]!r}; the cache was built with "
                    f"{self.meta.get('transform_identity', '?')[:200]!r})"
                )
        if dataset is not None:
            n = len(dataset)  # type: ignore[arg-type]
            if fingerprint_dataset(dataset) != stored["dataset"]:
                problems.append(
                    f"dataset differs (now {_dataset_name(dataset)} with {n} samples; the cache "
                    f"was built from {self.meta.get('dataset_name', '?')} with {len(self)} "
                    "samples, and class, length or the first/middle/last samples do not match)"
                )
        if problems:
            raise ValueError(
                f"TeacherCache at {self.path} does not match: "
                + "; ".join(problems)
                + f". Its outputs would be wrong for this run; {_REBUILD_HINT} with this "
                "teacher, dataset and transform (or pass the matching transform_id)"
            )

    # ---- building ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        dataset: Dataset,
        path: str | os.PathLike,
        *,
        features: Sequence[str] | None = None,
        top_k: int | None = None,
        batch_size: int = 256,
        epochs: int = 1,
        seed: int | None = None,
        transform_id: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        topk_dtype: torch.dtype = torch.float16,
        logits: Callable[[Any], Tensor] | None = None,
        num_workers: int = 0,
        checkpoint_every: int = 16,
    ) -> TeacherCache:
        """Run ``teacher`` (eval, no_grad) over ``dataset`` once per view and store the outputs.

        ``dataset`` yields ``(x, y, index)``; ``epochs = K`` views need a :class:`SeededViews`
        with ``num_views=K``. ``seed`` is the views' seed: None takes the SeededViews' own (0
        without one); a value that differs from the SeededViews' seed is refused. The
        teacher is moved to ``device``. ``dtype`` is the storage dtype of dense logits and
        features (float32 or float16), ``topk_dtype`` that of top-k log-probabilities.
        Progress is flushed every ``checkpoint_every`` batches to ``.<name>.partial/`` next to
        ``path``; calling build again with the same arguments resumes and gives the same bytes
        as an uninterrupted build. The finished directory is renamed into place atomically. If
        a finished cache with the same fingerprint and settings is already at ``path``, it is
        opened instead of rebuilt.
        """
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(
                f"TeacherCache.build: top_k must be a positive int or None, got {top_k!r}"
            )
        for name, value in (
            ("batch_size", batch_size),
            ("epochs", epochs),
            ("checkpoint_every", checkpoint_every),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"TeacherCache.build: {name} must be a positive int, got {value!r}"
                )
        for name, value in (("dtype", dtype), ("topk_dtype", topk_dtype)):
            if value not in _DTYPES:
                raise ValueError(
                    f"TeacherCache.build: {name}={value} is not supported; use torch.float32 "
                    "or torch.float16"
                )
        path = Path(path)
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("TeacherCache.build: the dataset is empty (len 0)")
        features = list(features or [])
        _check_indexed(dataset, n)
        _check_replayable(dataset, n, epochs)
        views = _find_seeded_views(dataset)
        if views is not None and seed is not None and int(seed) != views.seed:
            raise ValueError(
                f"TeacherCache.build: seed={seed} but the dataset's SeededViews has seed="
                f"{views.seed}; the cache records the seed the student replays its views with, "
                "so they must agree: pass seed=None or the SeededViews' seed"
            )
        seed = views.seed if views is not None else int(seed or 0)
        fingerprint = _fingerprint(teacher, dataset, transform_id)
        settings = {
            "num_samples": n,
            "num_views": epochs,
            "top_k": top_k,
            "seed": int(seed),
            "dtype": _DTYPES[dtype],
            "topk_dtype": _DTYPES[topk_dtype] if top_k else None,
            "features": features,
            "batch_size": batch_size,
            "fingerprint": fingerprint,
        }

        if (path / _META).is_file():
            try:
                old = json.loads((path / _META).read_text())
                if old.get("settings") == settings:
                    return cls.open(path, verify=True)
            except (ValueError, OSError):
                pass  # unreadable or corrupted: rebuild it below

        tmp = path.parent / f".{path.name}.partial"
        partial = tmp / _PARTIAL_META
        state: dict | None = None
        if partial.is_file():
            try:
                state = json.loads(partial.read_text())
            except json.JSONDecodeError:
                state = None
            if state is not None and state.get("settings") != settings:
                warnings.warn(
                    f"TeacherCache.build: discarding the unfinished build in {tmp}: it was "
                    "started with a different teacher, dataset, transform or settings",
                    stacklevel=2,
                )
                state = None
        if state is None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

        device = torch.device(device)
        was_training = teacher.training
        teacher.to(device).eval()
        capture = None
        if features:
            from kdkit.capture import FeatureCapture  # lazy: only needed for feature caching

            capture = FeatureCapture(teacher, features)
        try:
            meta = cls._run(
                teacher,
                dataset,
                tmp,
                state,
                settings,
                capture,
                device,
                dtype,
                topk_dtype,
                logits or _default_logits,
                num_workers,
                checkpoint_every,
            )
        finally:
            if capture is not None:
                capture.close()
            teacher.train(was_training)

        meta["transform_identity"] = _transform_identity(dataset, transform_id)
        meta["dataset_name"] = _dataset_name(dataset)
        for info in meta["arrays"].values():
            file = tmp / info["file"]
            info["bytes"] = file.stat().st_size
            info["sha256"] = _sha256_file(file)
        _write_json_atomic(tmp / _META, meta)
        partial.unlink()
        # A directory cannot be os.replace'd over a non-empty one: move the old one aside first.
        old_dir = path.parent / f".{path.name}.old"
        if old_dir.exists():
            shutil.rmtree(old_dir)
        if path.exists():
            os.replace(path, old_dir)
        os.replace(tmp, path)
        if old_dir.exists():
            shutil.rmtree(old_dir)
        return cls.open(path, verify=False)

    @staticmethod
    def _run(
        teacher: nn.Module,
        dataset: Dataset,
        tmp: Path,
        state: dict | None,
        settings: dict,
        capture: Any,
        device: torch.device,
        dtype: torch.dtype,
        topk_dtype: torch.dtype,
        select_logits: Callable[[Any], Tensor],
        num_workers: int,
        checkpoint_every: int,
    ) -> dict:
        n, k_views, top_k = settings["num_samples"], settings["num_views"], settings["top_k"]
        arrays: dict[str, np.ndarray] = {}
        meta: dict = state["meta"] if state is not None else {}
        if state is not None:
            for name, info in meta["arrays"].items():
                arrays[name] = np.lib.format.open_memmap(tmp / info["file"], mode="r+")
        rows_done = state["rows_done"] if state is not None else 0

        def save_progress(rows: int) -> None:
            for arr in arrays.values():
                arr.flush()
            _write_json_atomic(
                tmp / _PARTIAL_META, {"settings": settings, "meta": meta, "rows_done": rows}
            )

        def allocate(outputs: dict[str, Tensor], logits_shape: list[int]) -> None:
            meta.update(
                format_version=FORMAT_VERSION,
                num_samples=n,
                num_views=k_views,
                top_k=top_k,
                seed=settings["seed"],
                logits_shape=logits_shape,
                features={},
                arrays={},
                fingerprint=settings["fingerprint"],
                settings=settings,
            )
            for i, p in enumerate(settings["features"]):
                meta["features"][p] = f"feat_{i:03d}"
            for name, value in outputs.items():
                info = {
                    "file": f"{name}.npy",
                    "dtype": str(value.dtype),
                    "shape": [k_views, n, *value.shape[1:]],
                }
                meta["arrays"][name] = info
                arrays[name] = np.lib.format.open_memmap(
                    tmp / info["file"], mode="w+", dtype=value.dtype, shape=tuple(info["shape"])
                )

        batch_size = settings["batch_size"]
        for view in range(k_views):
            if rows_done >= (view + 1) * n:
                continue
            start = max(0, rows_done - view * n)
            with _at_view(dataset, view):
                loader = DataLoader(
                    dataset,
                    batch_size=batch_size,
                    sampler=range(start, n),
                    num_workers=num_workers,
                )
                batches_since_save = 0
                pos = start
                for batch in loader:
                    x, index = batch[0], batch[2]
                    expect = torch.arange(pos, pos + len(index))
                    if not torch.equal(torch.as_tensor(index).long().cpu(), expect):
                        raise ValueError(
                            f"TeacherCache.build: the dataset's index element does not match "
                            f"the sample position (expected {pos}..{pos + len(index) - 1}, got "
                            f"{index.tolist()[:8]}...); {_WRAP_HINT}"
                        )
                    x = _to_device(x, device)
                    if capture is not None:
                        capture.clear()
                    with torch.no_grad():
                        out = teacher(**x) if isinstance(x, dict) else teacher(x)
                    z = select_logits(out).detach()
                    outputs: dict[str, np.ndarray] = {}
                    if top_k is None:
                        outputs["logits"] = z.to("cpu", dtype).numpy()
                    else:
                        if top_k > z.shape[-1]:
                            raise ValueError(
                                f"TeacherCache.build: top_k={top_k} exceeds the number of "
                                f"classes C={z.shape[-1]}; use top_k <= {z.shape[-1]}"
                            )
                        values, idx, tail = topk_compress(z.to("cpu"), top_k)
                        outputs["topk_logp"] = values.to(topk_dtype).numpy()
                        outputs["topk_index"] = idx.numpy().astype(_index_dtype(z.shape[-1]))
                        outputs["topk_tail"] = tail.to(torch.float32).numpy()
                    if capture is not None:
                        feats = capture.features
                        for i, p in enumerate(settings["features"]):
                            if p not in feats:
                                raise ValueError(
                                    f"TeacherCache.build: feature {p!r} was not captured in the "
                                    "teacher's forward (the module did not run)"
                                )
                            outputs[f"feat_{i:03d}"] = feats[p].detach().to("cpu", dtype).numpy()
                    if not arrays:
                        allocate(outputs, list(z.shape[1:]))
                    for name, value in outputs.items():
                        arr = arrays[name]
                        if value.shape[1:] != arr.shape[2:] or value.dtype != arr.dtype:
                            raise ValueError(
                                f"TeacherCache.build: output {name!r} has per-sample shape "
                                f"{list(value.shape[1:])} at sample {pos}, but "
                                f"{list(arr.shape[2:])} earlier; the cache needs a fixed shape "
                                "per sample (pad variable-length inputs to one length)"
                            )
                        arr[view, pos : pos + len(value)] = value
                    pos += len(index)
                    batches_since_save += 1
                    if batches_since_save >= checkpoint_every:
                        save_progress(view * n + pos)
                        batches_since_save = 0
                save_progress((view + 1) * n)
        for arr in arrays.values():
            arr.flush()
        arrays.clear()
        meta["rows_done"] = n * k_views
        meta["samples_done"] = n
        return meta
