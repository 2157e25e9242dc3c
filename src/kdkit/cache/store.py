"""The teacher cache on disk: build (resumable), open (verified), read back by sample index.

See :mod:`kdkit.cache` for the directory layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdkit.atomic import atomic_write_text, replace_dir
from kdkit.batch import call_model, to_device
from kdkit.cache.checks import _WRAP_HINT, _check_indexed, _check_replayable
from kdkit.cache.fingerprint import (
    _dataset_name,
    _fingerprint,
    _transform_identity,
    fingerprint_dataset,
    fingerprint_teacher,
)
from kdkit.cache.partial import PARTIAL_META, PartialBuild
from kdkit.cache.progress import BuildProgress
from kdkit.cache.topk import _index_dtype, topk_compress, topk_reconstruct
from kdkit.cache.views import SeededViews, _at_view, _find_seeded_views
from kdkit.capture import select_tensor

__all__ = ["FORMAT_VERSION", "TeacherCache"]

# 2: the dataset fingerprint hashes inputs only (labels do not change teacher outputs), and an
# unfinished build records a checksum per block.
FORMAT_VERSION = 2
_META = "meta.json"
_META_KEYS = ("format_version", "arrays", "fingerprint", "num_samples", "num_views", "logits_shape")
logger = logging.getLogger(__name__)

_REBUILD_HINT = "rebuild it with `kdkit.cache.TeacherCache.build(...)` or `kdkit cache`"
_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# Files whose sha256 this process has verified, by resolved path: (identity, sha256). A file
# whose identity (device, inode, size, mtime, ctime) is unchanged is not read again; writing
# to it, replacing it, or restoring its mtime (which sets ctime) all change the identity.
_VERIFIED: dict[str, tuple[tuple[int, ...], str]] = {}
# A file changed within its file system's timestamp granularity of the verification could
# keep its identity (like git's "racily clean" entries): such a file is hashed on every open.
_RACY_NS = 2 * 10**9


def _now_ns() -> int:
    return time.time_ns()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _checksum_matches(file: Path, sha256: str) -> bool:
    """Whether ``file`` hashes to ``sha256``; once per process for an unchanged file."""
    key = str(file.resolve())
    before = _identity(file.stat())
    if _VERIFIED.get(key) == (before, sha256):
        return True
    started = _now_ns()
    if _sha256_file(file) != sha256:
        return False
    after = file.stat()
    if (
        _identity(after) == before
        and max(after.st_mtime_ns, after.st_ctime_ns) < started - _RACY_NS
    ):
        _VERIFIED[key] = (before, sha256)
    return True


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def _load_meta(
    path: Path, who: str, required: Sequence[str], format_version: int, hint: str
) -> dict:
    """``path/meta.json`` of a finished cache, checked; errors say what is wrong and ``hint``."""
    meta_path = path / _META
    if not meta_path.is_file():
        partial = path.parent / f".{path.name}.partial" / PARTIAL_META
        if partial.is_file():
            done = json.loads(partial.read_text()).get("rows_done", 0)
            raise FileNotFoundError(
                f"{who}: {path} is not finished (the build stopped after {done} "
                f"rows); call {who}.build again with the same arguments to resume it"
            )
        raise FileNotFoundError(f"{who}: no cache at {path} ({meta_path} missing); {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{who}: {meta_path} is corrupted ({exc}); {hint}") from exc
    missing = [k for k in required if k not in meta] if isinstance(meta, dict) else list(required)
    if missing or not isinstance(meta.get("arrays"), dict):
        raise ValueError(
            f"{who}: {meta_path} is corrupted (not a kdkit cache description; missing "
            f"{missing or ['arrays']}); {hint}"
        )
    if meta.get("format_version") != format_version:
        raise ValueError(
            f"{who}: {meta_path} has format_version {meta.get('format_version')!r}, "
            f"this kdkit reads {format_version}; {hint}"
        )
    return meta


def _verify_arrays(path: Path, arrays: dict, who: str, hint: str, checksums: bool) -> None:
    """Each array file of ``arrays`` (meta.json's) exists, has its size and (optionally) sha256."""
    for info in arrays.values():
        file = path / info["file"]
        if not file.is_file():
            raise ValueError(f"{who}: array file {file} is missing; {hint}")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise ValueError(
                f"{who}: array file {file} has {size} bytes, meta.json records "
                f"{info['bytes']} (truncated or overwritten); {hint}"
            )
        if checksums and not _checksum_matches(file, info["sha256"]):
            raise ValueError(
                f"{who}: array file {file} fails its sha256 checksum (corrupted); {hint}"
            )


def _finish_build(tmp: Path, path: Path, meta: dict) -> None:
    """Record each array's size and sha256 in ``meta``, write it, and rename ``tmp`` to
    ``path`` (replacing what is there)."""
    for info in meta["arrays"].values():
        file = tmp / info["file"]
        info["bytes"] = file.stat().st_size
        info["sha256"] = _sha256_file(file)
    _write_json_atomic(tmp / _META, meta)
    (tmp / PARTIAL_META).unlink(missing_ok=True)
    replace_dir(tmp, path)


class _MappedCache:
    """A finished cache directory: its ``meta.json`` and its arrays, memory-mapped lazily (and
    reopened in each process: DataLoader workers, DDP ranks)."""

    _who = "TeacherCache"
    _unit = "sample"

    def __init__(self, path: str | os.PathLike, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def fingerprint(self) -> dict:
        return dict(self.meta["fingerprint"])

    def __getstate__(self) -> dict:
        return {"path": self.path, "meta": self.meta, "_arrays": None}

    def _array(self, name: str) -> np.ndarray:
        if self._arrays is None:
            self._arrays = {
                key: np.load(self.path / info["file"], mmap_mode="r")
                for key, info in self.meta["arrays"].items()
            }
        return self._arrays[name]

    def _indices(self, index: Tensor | Sequence[int]) -> tuple[np.ndarray, torch.device]:
        """``index`` as int64 ``[B]`` checked against ``len(self)``, and the device to return on
        (``index``'s when it is a tensor)."""
        device = index.device if isinstance(index, Tensor) else torch.device("cpu")
        idx = index.detach().to("cpu").numpy() if isinstance(index, Tensor) else np.asarray(index)
        if idx.dtype.kind not in "iu":
            raise TypeError(
                f"{self._who}.teacher_output: index must hold integers, got dtype {idx.dtype}"
            )
        idx = idx.astype(np.int64).reshape(-1)
        n = len(self)  # type: ignore[arg-type]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise IndexError(
                f"{self._who}.teacher_output: {self._unit} index {bad} out of range [0, {n}); "
                f"the cache was built for a dataset of {n} {self._unit}s"
            )
        return idx, device


def _reuse(path: Path, settings: dict, who: str) -> bool:
    """Whether the finished cache at ``path`` was built with ``settings`` (then it is opened,
    not rebuilt); warns when a cache built otherwise is about to be replaced."""
    if not (path / _META).is_file():
        return False
    try:
        if json.loads((path / _META).read_text()).get("settings") == settings:
            return True
    except (ValueError, OSError):
        return False  # unreadable or corrupted: rebuilt
    warnings.warn(
        f"{who}.build: replacing the cache at {path}, which was built with a different "
        "teacher, data or settings (it stays readable until the new one is complete)",
        stacklevel=3,
    )
    return False


class TeacherCache(_MappedCache):
    """Teacher outputs for every sample (and every augmented view), read back by sample index.

    Build once with :meth:`build`, reopen with :meth:`open`; then in the training loop::

        out = cache.teacher_output(batch_index, epoch)   # {"logits": [B, C], "features": {...}}

    ``bytes_per_sample`` is the stored payload per sample over all K views (npy headers and
    meta.json excluded): dense float32 costs ``4 * C * K``, top-k costs
    ``K * (k * (2 + 2 or 4) + 4)`` bytes per sample for fp16 values, int16/int32 indices and a
    float32 tail.
    """

    # ---- public properties ---------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def num_views(self) -> int:
        return int(self.meta["num_views"])

    @property
    def replays_views(self) -> bool:
        """Whether the cache was built from a :class:`SeededViews`: training must read through
        :meth:`seeded_views` to see the views the teacher saw."""
        return bool(self.meta.get("seeded_views", False))

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

    def seeded_views(self, dataset: Dataset, transform: Callable[[Any], Any] | None) -> SeededViews:
        """The training-side :class:`SeededViews` with this cache's seed and number of views."""
        return SeededViews(dataset, transform, seed=self.seed, num_views=self.num_views)

    # ---- reading -------------------------------------------------------------------------

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
        idx, device = self._indices(index)
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
        on trusted storage). A file is hashed once per process: opening the same cache again
        re-hashes only files whose device, inode, size, mtime or ctime changed since (or that
        were modified within 2 s of being hashed, which a timestamp might not reveal). Any part
        given that differs from what the cache was built from raises ValueError naming the part
        (teacher weights / dataset / transform).
        """
        path = Path(path)
        meta = _load_meta(path, "TeacherCache", _META_KEYS, FORMAT_VERSION, _REBUILD_HINT)
        cache = cls(path, meta)
        _verify_arrays(path, meta["arrays"], "TeacherCache", _REBUILD_HINT, checksums=verify)
        cache.check(teacher=teacher, dataset=dataset, transform_id=transform_id)
        return cache

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
                name, built_from = _dataset_name(dataset), self.meta.get("dataset_name", "?")
                if name == built_from and n == len(self):
                    why = (
                        "same class and length, but the sampled inputs differ: other data, or "
                        "random augmentation giving another view on each read (turn it off, "
                        "e.g. data.augment=false, or replay views with kdkit.cache.SeededViews)"
                    )
                else:
                    why = f"now {name} with {n} samples, built from {built_from} with {len(self)}"
                problems.append(f"dataset differs ({why})")
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
        progress: bool = True,
    ) -> TeacherCache:
        """Run ``teacher`` (eval, no_grad) over ``dataset`` once per view and store the outputs.

        ``dataset`` yields ``(x, y, index)``; ``epochs = K`` views need a :class:`SeededViews`
        with ``num_views=K``. ``seed`` is the views' seed: None takes the SeededViews' own (0
        without one); a value that differs from the SeededViews' seed is refused. The
        teacher is moved to ``device``. ``dtype`` is the storage dtype of dense logits and
        features (float32 or float16), ``topk_dtype`` that of top-k log-probabilities.
        Outputs are written to ``.<name>.partial/`` next to ``path`` in blocks of
        ``checkpoint_every`` batches; each completed block is flushed and its sha256 recorded
        atomically. Calling build again with the same arguments resumes: it re-hashes every
        recorded block, re-computes those that fail (truncated, zeroed or altered since) and
        those never recorded, logs where it resumes and how many blocks failed, and gives the
        same bytes as an uninterrupted build. The finished directory is renamed into place
        atomically. If a finished cache with the same fingerprint and settings is already at
        ``path``, it is opened instead of rebuilt. ``progress`` shows a progress bar (samples,
        samples/s, time left) on stderr when stderr is a terminal.
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

        if _reuse(path, settings, "TeacherCache"):
            return cls.open(path, verify=True)

        tmp = path.parent / f".{path.name}.partial"
        build = PartialBuild.resume_or_start(tmp, settings, batch_size * checkpoint_every)
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
                build,
                capture,
                device,
                dtype,
                topk_dtype,
                logits or select_tensor,
                num_workers,
                progress,
            )
        finally:
            build.close()
            if capture is not None:
                capture.close()
            teacher.train(was_training)

        meta["transform_identity"] = _transform_identity(dataset, transform_id)
        meta["seeded_views"] = _find_seeded_views(dataset) is not None
        meta["dataset_name"] = _dataset_name(dataset)
        _finish_build(tmp, path, meta)
        logger.info("TeacherCache.build: wrote %s (%d samples x %d views)", path, n, epochs)
        return cls.open(path, verify=False)

    @staticmethod
    def _outputs(
        z: Tensor, capture: Any, settings: dict, dtype: torch.dtype, topk_dtype: torch.dtype
    ) -> dict[str, np.ndarray]:
        """The arrays stored for one batch of teacher logits ``z`` (and captured features)."""
        top_k = settings["top_k"]
        outputs: dict[str, np.ndarray] = {}
        if top_k is None:
            outputs["logits"] = z.to("cpu", dtype).numpy()
        else:
            if top_k > z.shape[-1]:
                raise ValueError(
                    f"TeacherCache.build: top_k={top_k} exceeds the number of classes "
                    f"C={z.shape[-1]}; use top_k <= {z.shape[-1]}"
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
                        f"TeacherCache.build: feature {p!r} was not captured in the teacher's "
                        "forward (the module did not run)"
                    )
                outputs[f"feat_{i:03d}"] = feats[p].detach().to("cpu", dtype).numpy()
        return outputs

    @staticmethod
    def _new_meta(settings: dict, outputs: dict[str, np.ndarray], logits_shape: list[int]) -> dict:
        n, k_views = settings["num_samples"], settings["num_views"]
        return {
            "format_version": FORMAT_VERSION,
            "num_samples": n,
            "num_views": k_views,
            "top_k": settings["top_k"],
            "seed": settings["seed"],
            "logits_shape": logits_shape,
            "features": {p: f"feat_{i:03d}" for i, p in enumerate(settings["features"])},
            "arrays": {
                name: {
                    "file": f"{name}.npy",
                    "dtype": str(value.dtype),
                    "shape": [k_views, n, *value.shape[1:]],
                }
                for name, value in outputs.items()
            },
            "fingerprint": settings["fingerprint"],
            "settings": settings,
        }

    @classmethod
    def _run(
        cls,
        teacher: nn.Module,
        dataset: Dataset,
        build: PartialBuild,
        capture: Any,
        device: torch.device,
        dtype: torch.dtype,
        topk_dtype: torch.dtype,
        select_logits: Callable[[Any], Tensor],
        num_workers: int,
        progress: bool,
    ) -> dict:
        """Compute every block ``build`` has not verified, view by view, in sample order."""
        settings = build.settings
        n, k_views = settings["num_samples"], settings["num_views"]
        todo = {view: build.todo(view) for view in range(k_views)}
        total = sum(stop - start for runs in todo.values() for start, stop in runs)
        label = "teacher cache" if build.rows_done == 0 else "teacher cache (resumed)"
        with BuildProgress(total, progress, label) as bar:
            for view, runs in todo.items():
                for start, stop in runs:
                    for pos, x in _batches(dataset, view, start, stop, settings, num_workers):
                        if capture is not None:
                            capture.clear()
                        with torch.no_grad():
                            out = call_model(teacher, to_device(x, device))
                        z = select_logits(out).detach()
                        outputs = cls._outputs(z, capture, settings, dtype, topk_dtype)
                        if not build.arrays:
                            build.allocate(cls._new_meta(settings, outputs, list(z.shape[1:])))
                        build.write(view, pos, outputs)
                        end = pos + len(z)
                        bar.advance(len(z))
                        if end % build.block_rows == 0 or end == n:
                            build.complete(view, (end - 1) // build.block_rows)
        meta = build.meta
        meta["rows_done"] = n * k_views
        meta["samples_done"] = n
        return meta


def _batches(
    dataset: Dataset, view: int, start: int, stop: int, settings: dict, num_workers: int
) -> Iterator[tuple[int, Any]]:
    """``(position of the first sample, inputs)`` of samples ``start .. stop - 1`` at ``view``,
    batch by batch, in order; refuses a dataset whose index element is not the position."""
    with _at_view(dataset, view):
        loader = DataLoader(
            dataset,
            batch_size=settings["batch_size"],
            sampler=range(start, stop),
            num_workers=num_workers,
        )
        pos = start
        for batch in loader:
            x, index = batch[0], batch[2]
            expect = torch.arange(pos, pos + len(index))
            if not torch.equal(torch.as_tensor(index).long().cpu(), expect):
                raise ValueError(
                    "TeacherCache.build: the dataset's index element does not match the sample "
                    f"position (expected {pos}..{pos + len(index) - 1}, got "
                    f"{index.tolist()[:8]}...); {_WRAP_HINT}"
                )
            yield pos, x
            pos += len(index)
