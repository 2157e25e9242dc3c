"""Offline teacher signals for language models: per-token top-k log-probabilities + tail mass.

Layout of a token cache directory ``path`` (T tokens over N variable-length sequences, no
padding stored; the leading axis of 1 is the view axis the build machinery shares with
:class:`kdkit.cache.TeacherCache`)::

    path/meta.json        sizes, top_k, vocab_size, fingerprint, sha256 per array
    path/offsets.npy      int64 [N + 1]: sequence i is tokens offsets[i] .. offsets[i+1] - 1
    path/topk_logp.npy    float16 [1, T, k]: the teacher's top-k log-probabilities (T = 1)
    path/topk_index.npy   uint16 [1, T, k] when V <= 65536, else int32: their token ids
    path/log_tail.npy     float16 [1, T]: log of the probability mass outside the top-k

so a token costs ``4k + 2`` bytes (``6k + 2`` with int32 ids): 130 at k = 32, 258 at k = 64.
Build, verification and resume are :class:`kdkit.cache.TeacherCache`'s: the build writes into
``.<name>.partial/`` in blocks of ``batch_size * checkpoint_every`` sequences, records each
completed block's sha256, resumes from the blocks that still match, and renames the directory
into place; :meth:`TokenCache.open` checks sizes and sha256 (once per process for unchanged
files) and refuses another teacher, data set, tokenizer or vocabulary size, naming which.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdkit.batch import call_model
from kdkit.cache.checks import _WRAP_HINT, _index_of
from kdkit.cache.fingerprint import _dataset_name, fingerprint_dataset, fingerprint_teacher
from kdkit.cache.partial import PartialBuild
from kdkit.cache.progress import BuildProgress
from kdkit.cache.store import _finish_build, _load_meta, _MappedCache, _reuse, _verify_arrays
from kdkit.cache.topk import topk_log_compress, topk_reconstruct
from kdkit.capture import select_tensor
from kdkit.functional import topk_at_temperature

__all__ = ["TOKEN_FORMAT_VERSION", "TokenCache", "TopKTokens"]

TOKEN_FORMAT_VERSION = 1
_META_KEYS = ("format_version", "arrays", "fingerprint", "num_sequences", "num_tokens", "top_k")
_REBUILD_HINT = "rebuild it with `kdkit.cache.TokenCache.build(...)`"
logger = logging.getLogger(__name__)


def _token_index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class TopKTokens(NamedTuple):
    """A batch of cached teacher distributions, right-padded to the batch's longest sequence.

    ``values`` float32 ``[B, L, k]`` (log-probabilities at T = 1), ``indices`` int64
    ``[B, L, k]``, ``log_tail`` float32 ``[B, L]`` (log of the mass outside the top-k),
    ``lengths`` int64 ``[B]``; padded positions hold zeros (use :attr:`mask`). The first three
    are what :func:`kdkit.functional.sparse_kl_div` reads, so the tuple itself is the sparse
    target: ``SparseKLDivLoss()(student_logits, cached, mask=cached.mask)``.
    """

    values: Tensor
    indices: Tensor
    log_tail: Tensor
    lengths: Tensor
    vocab_size: int

    @property
    def mask(self) -> Tensor:
        """Bool ``[B, L]``: True at the real (not padded) tokens."""
        positions = torch.arange(self.values.shape[1], device=self.lengths.device)
        return positions < self.lengths.unsqueeze(1)

    def at_temperature(self, temperature: float) -> TopKTokens:
        """The same tokens at ``temperature``: kept ratios exact, normaliser approximate (see
        :func:`kdkit.functional.topk_at_temperature`)."""
        values, log_tail = topk_at_temperature(
            self.values, self.log_tail, self.vocab_size, temperature
        )
        return self._replace(values=values, log_tail=log_tail)

    def dense(self, temperature: float = 1.0) -> Tensor:
        """Approximate teacher log-probabilities ``[B, L, V]`` (float32).

        The top-k entries are the stored values; the tail mass is spread uniformly over the
        remaining ``V - k`` classes (each gets ``log(m / (V - k))``), and every row is
        renormalised (fp16 storage rounds the values). Exact up to fp16 when ``k = V``. At
        ``T != 1``, :meth:`at_temperature` first. Costs a full ``[B, L, V]`` tensor: the
        sparse form with :class:`kdkit.losses.SparseKLDivLoss` does not.
        """
        t = self.at_temperature(temperature)
        logits = topk_reconstruct(t.values, t.indices, t.log_tail.exp(), self.vocab_size)
        return torch.log_softmax(logits, dim=-1)

    def to(self, device: torch.device | str) -> TopKTokens:
        return TopKTokens(
            self.values.to(device),
            self.indices.to(device),
            self.log_tail.to(device),
            self.lengths.to(device),
            self.vocab_size,
        )


class TokenCache(_MappedCache):
    """A causal LM teacher's top-k distribution at every token of a data set of sequences.

    Build once with :meth:`build`, reopen with :meth:`open`, then per batch::

        cached = cache.teacher_output(index)        # TopKTokens, padded to the batch
        loss = SparseKLDivLoss()(student_logits, cached, mask=cached.mask)

    ``bytes_per_token`` is the stored payload per token (offsets and meta.json excluded).
    """

    _who = "TokenCache"
    _unit = "sequence"

    # ---- public properties ---------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.meta["num_sequences"])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self._array("offsets"))

    @property
    def bytes_per_token(self) -> int:
        arrays = self.meta["arrays"]
        return sum(
            np.dtype(arrays[name]["dtype"]).itemsize * int(np.prod(arrays[name]["shape"][2:]))
            for name in ("topk_logp", "topk_index", "log_tail")
        )

    def __repr__(self) -> str:
        return (
            f"TokenCache({str(self.path)!r}, sequences={len(self)}, tokens={self.num_tokens}, "
            f"top_k={self.top_k}, vocab_size={self.vocab_size}, "
            f"bytes_per_token={self.bytes_per_token})"
        )

    # ---- reading -------------------------------------------------------------------------

    def teacher_output(self, index: Tensor | Sequence[int]) -> TopKTokens:
        """The cached tokens of sequences ``index``, right-padded to the longest of them; on
        ``index``'s device when it is a tensor."""
        idx, device = self._indices(index)
        offsets = self._array("offsets")
        starts, stops = offsets[idx], offsets[idx + 1]
        lengths = stops - starts
        width = int(lengths.max()) if idx.size else 0
        rows = (
            np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
            if idx.size
            else np.zeros(0, np.int64)
        )
        keep = np.arange(width) < lengths[:, None]
        k = self.top_k

        def padded(name: str, dtype: np.dtype, tail: tuple[int, ...]) -> Tensor:
            out = np.zeros((len(idx), width, *tail), dtype=dtype)
            out[keep] = self._array(name)[0, rows]
            return torch.from_numpy(out).to(device)

        return TopKTokens(
            padded("topk_logp", np.dtype(np.float32), (k,)),
            padded("topk_index", np.dtype(np.int64), (k,)),
            padded("log_tail", np.dtype(np.float32), ()),
            torch.from_numpy(lengths).to(device),
            self.vocab_size,
        )

    # ---- opening & verification ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        teacher: nn.Module | None = None,
        dataset: Dataset | None = None,
        tokenizer_id: str | None = None,
        vocab_size: int | None = None,
        verify: bool = True,
    ) -> TokenCache:
        """Open a built cache; check it against whichever of ``teacher`` (weights hash),
        ``dataset`` (class, length, 16 probed sequences, every sequence length),
        ``tokenizer_id`` and ``vocab_size`` are given. File sizes are always checked, sha256
        with ``verify=True`` (once per process for unchanged files, as
        :meth:`TeacherCache.open`)."""
        path = Path(path)
        meta = _load_meta(path, "TokenCache", _META_KEYS, TOKEN_FORMAT_VERSION, _REBUILD_HINT)
        cache = cls(path, meta)
        _verify_arrays(path, meta["arrays"], "TokenCache", _REBUILD_HINT, checksums=verify)
        cache.check(
            teacher=teacher, dataset=dataset, tokenizer_id=tokenizer_id, vocab_size=vocab_size
        )
        return cache

    def check(
        self,
        *,
        teacher: nn.Module | None = None,
        dataset: Dataset | None = None,
        tokenizer_id: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """Raise ValueError naming every part (teacher weights, data set, sequence lengths,
        tokenizer, vocabulary size) that differs from what the cache was built from."""
        stored = self.meta["fingerprint"]
        problems = []
        if teacher is not None and fingerprint_teacher(teacher) != stored["teacher"]:
            problems.append(
                "teacher weights differ from the ones the cache was built with (the state_dict "
                "hash does not match)"
            )
        if dataset is not None:
            n = len(dataset)  # type: ignore[arg-type]
            if n != len(self) or fingerprint_dataset(dataset) != stored["dataset"]:
                problems.append(
                    f"dataset differs (now {_dataset_name(dataset)} with {n} sequences, built "
                    f"from {self.meta.get('dataset_name', '?')} with {len(self)}; or the same "
                    "length with other token ids)"
                )
            elif _lengths_hash(_lengths(dataset)) != stored["lengths"]:
                problems.append("dataset differs (the sequence lengths are not the ones cached)")
        if tokenizer_id is not None and tokenizer_id != stored["tokenizer"]:
            problems.append(
                f"tokenizer differs (now {tokenizer_id[:16]!r}, built with "
                f"{str(stored['tokenizer'])[:16]!r})"
            )
        if vocab_size is not None and int(vocab_size) != self.vocab_size:
            problems.append(
                f"vocabulary size differs (now {vocab_size}, the teacher's is {self.vocab_size})"
            )
        if problems:
            raise ValueError(
                f"TokenCache at {self.path} does not match: "
                + "; ".join(problems)
                + f". Its outputs would be wrong for this run; {_REBUILD_HINT} with this "
                "teacher, data set and tokenizer"
            )

    # ---- building ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        dataset: Dataset,
        path: str | os.PathLike,
        *,
        top_k: int,
        tokenizer_id: str | None = None,
        batch_size: int = 16,
        pad_id: int = 0,
        device: str | torch.device = "cpu",
        logits: Callable[[Any], Tensor] | None = None,
        checkpoint_every: int = 16,
        progress: bool = True,
    ) -> TokenCache:
        """Run the causal LM ``teacher`` (eval, no_grad) over every sequence and store, per
        token, its top-``top_k`` log-probabilities (fp16), their ids and the log tail mass.

        ``dataset[i]`` yields ``(input_ids [L_i], labels, i)`` (e.g.
        :class:`kdkit.data.text.TokenSequences`; the labels are not read). Sequences are
        batched ``batch_size`` at a time, right-padded with ``pad_id`` and passed as
        ``teacher(input_ids)`` (a Hugging Face causal LM or a module returning ``[B, L, V]``;
        ``logits`` selects the tensor from another output); the padded positions are dropped,
        which is exact for a causal model. ``tokenizer_id`` (e.g. ``tokenizer.identity``) is
        recorded and checked on open. Reads every item once first, for the sequence lengths.
        Resumable, verified and atomic as :meth:`TeacherCache.build` (blocks of
        ``batch_size * checkpoint_every`` sequences); a finished cache with the same
        fingerprint and settings at ``path`` is opened instead of rebuilt.
        """
        for name, value in (
            ("top_k", top_k),
            ("batch_size", batch_size),
            ("checkpoint_every", checkpoint_every),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TokenCache.build: {name} must be a positive int, got {value!r}")
        path = Path(path)
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("TokenCache.build: the dataset is empty (len 0)")
        lengths = _lengths(dataset)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        settings = {
            "num_sequences": n,
            "num_tokens": int(offsets[-1]),
            "num_views": 1,
            "top_k": top_k,
            "batch_size": batch_size,
            "checkpoint_every": checkpoint_every,
            "pad_id": pad_id,
            "fingerprint": {
                "teacher": fingerprint_teacher(teacher),
                "dataset": fingerprint_dataset(dataset),
                "lengths": _lengths_hash(lengths),
                "tokenizer": tokenizer_id,
            },
        }
        if _reuse(path, settings, "TokenCache"):
            return cls.open(path, verify=True)
        per_block = batch_size * checkpoint_every
        bounds = [int(offsets[s]) for s in range(0, n, per_block)] + [int(offsets[-1])]
        tmp = path.parent / f".{path.name}.partial"
        build = PartialBuild.resume_or_start(
            tmp, settings, per_block, bounds, who="TokenCache", unit="token"
        )
        device = torch.device(device)
        was_training = teacher.training
        teacher.to(device).eval()
        try:
            cls._run(teacher, dataset, build, offsets, device, logits or select_tensor, progress)
        finally:
            build.close()
            teacher.train(was_training)
        meta = build.meta
        np.save(tmp / "offsets.npy", offsets)
        meta["arrays"]["offsets"] = {"file": "offsets.npy", "dtype": "int64", "shape": [n + 1]}
        meta["dataset_name"] = _dataset_name(dataset)
        _finish_build(tmp, path, meta)
        logger.info("TokenCache.build: wrote %s (%d sequences, %d tokens)", path, n, offsets[-1])
        return cls.open(path, verify=False)

    @staticmethod
    def _run(
        teacher: nn.Module,
        dataset: Dataset,
        build: PartialBuild,
        offsets: np.ndarray,
        device: torch.device,
        select_logits: Callable[[Any], Tensor],
        progress: bool,
    ) -> None:
        """Compute every block ``build`` has not verified, in sequence order."""
        settings = build.settings
        n, batch_size = settings["num_sequences"], settings["batch_size"]
        per_block = batch_size * settings["checkpoint_every"]
        todo = [j for j, sums in enumerate(build.blocks[0]) if sums is None]
        total = sum(build.block_range(j)[1] - build.block_range(j)[0] for j in todo)
        label = "token cache" if build.rows_done == 0 else "token cache (resumed)"
        with BuildProgress(total, progress, label, unit="tokens") as bar:
            for j in todo:
                for first in range(j * per_block, min((j + 1) * per_block, n), batch_size):
                    seqs = range(first, min(first + batch_size, n))
                    z = _teacher_logits(teacher, dataset, seqs, settings, device, select_logits)
                    if settings["top_k"] > z.shape[-1]:
                        raise ValueError(
                            f"TokenCache.build: top_k={settings['top_k']} exceeds the teacher's "
                            f"vocabulary size V={z.shape[-1]}; use top_k <= {z.shape[-1]}"
                        )
                    values, index, log_tail = topk_log_compress(z, settings["top_k"])
                    outputs = {
                        "topk_logp": values.to(torch.float16).numpy(),
                        "topk_index": index.numpy().astype(_token_index_dtype(z.shape[-1])),
                        "log_tail": log_tail.to(torch.float16).numpy(),
                    }
                    if not build.arrays:
                        build.allocate(_new_meta(settings, outputs, z.shape[-1]))
                    build.write(0, int(offsets[first]), outputs)
                    bar.advance(len(z))
                build.complete(0, j)
        build.meta["rows_done"] = settings["num_tokens"]


def _lengths(dataset: Dataset) -> np.ndarray:
    n = len(dataset)  # type: ignore[arg-type]
    return np.array([len(dataset[i][0]) for i in range(n)], dtype=np.int64)


def _lengths_hash(lengths: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes()).hexdigest()


def _new_meta(settings: dict, outputs: dict[str, np.ndarray], vocab_size: int) -> dict:
    tokens = settings["num_tokens"]
    return {
        "format_version": TOKEN_FORMAT_VERSION,
        "num_sequences": settings["num_sequences"],
        "num_tokens": tokens,
        "top_k": settings["top_k"],
        "vocab_size": int(vocab_size),
        "arrays": {
            name: {"file": f"{name}.npy", "dtype": str(v.dtype), "shape": [1, tokens, *v.shape[1:]]}
            for name, v in outputs.items()
        },
        "fingerprint": settings["fingerprint"],
        "settings": settings,
    }


def _teacher_logits(
    teacher: nn.Module,
    dataset: Dataset,
    seqs: range,
    settings: dict,
    device: torch.device,
    select_logits: Callable[[Any], Tensor],
) -> Tensor:
    """The teacher's logits ``[tokens, V]`` (float32, CPU) of sequences ``seqs``, concatenated
    without their padding."""
    items = []
    for i in seqs:
        item = dataset[i]
        if _index_of(item) != i:
            raise ValueError(
                f"TokenCache.build: dataset[{i}] must be (input_ids, labels, {i}) so that teacher "
                f"outputs are stored by sequence index; {_WRAP_HINT}"
            )
        items.append(torch.as_tensor(item[0]).long().reshape(-1))
    width = max(len(x) for x in items)
    ids = torch.full((len(items), width), settings["pad_id"], dtype=torch.long)
    for row, x in enumerate(items):
        ids[row, : len(x)] = x
    with torch.no_grad():
        z = select_logits(call_model(teacher, ids.to(device))).detach()
    if z.dim() != 3 or tuple(z.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"TokenCache.build: the teacher's logits have shape {tuple(z.shape)} for input_ids "
            f"{tuple(ids.shape)}; a causal LM must give [B, L, V] (pass logits= to select them)"
        )
    z = z.to("cpu", torch.float32)
    return torch.cat([z[row, : len(x)] for row, x in enumerate(items)])
