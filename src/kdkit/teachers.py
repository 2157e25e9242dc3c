"""Where a Distiller's teacher outputs come from, and how several teachers become one.

One interface, :meth:`Teachers.outputs`: for a batch it returns a :class:`TeacherOutputs` (one
logits tensor and one ``{path: feature}`` dict per teacher), taken from the ``teacher_output``
given with the batch when there is one, else from the :class:`TeacherSource`:

* :class:`OnlineTeachers`: frozen ``nn.Module`` teachers run in eval mode under ``no_grad``
  (optionally under autocast, compiled, in channels_last), with feature hooks for feature terms;
* :class:`CachedTeacher`: a :class:`kdkit.cache.TeacherCache` read by sample index and epoch,
  or a :class:`kdkit.cache.TokenCache` (per-token top-k) read by sequence index, for
  :class:`kdkit.losses.SparseKLDivLoss` terms.

A new source (a token cache, a remote or generating teacher) subclasses :class:`TeacherSource`
and can be passed to ``Distiller(student, teacher=source, ...)``. :meth:`Teachers.ensemble`
turns several teachers' logits into the one tensor a logit loss reads.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdkit.batch import call_model
from kdkit.cache.tokens import TokenCache, TopKTokens
from kdkit.capture import Selector, StepCapture, select_tensor
from kdkit.contract import DistillationLoss
from kdkit.losses import SparseKLDivLoss

_TRAINING = attrgetter("training")
_NO_AUTOCAST = contextlib.nullcontext()  # stateless, so one serves every step


class TeacherOutputs(NamedTuple):
    """Per teacher: its logits (or, from a token cache, its sparse :class:`TopKTokens`) and the
    features the terms read (``{module path: tensor}``); ``mask``: the tokens the teacher has
    outputs for (bool ``[B, L]``), when not all of them."""

    logits: list[Tensor | TopKTokens]
    features: list[dict[str, Tensor]]
    mask: Tensor | None = None


class TeacherSource(ABC):
    """Where teacher outputs come from when the batch brings none. Subclass for a new kind."""

    @property
    def modules(self) -> list[nn.Module]:
        """The teacher modules this source runs (moved by ``Distiller.to()``); none by default."""
        return []

    @abstractmethod
    def outputs(
        self, inputs: Any, *, index: Tensor | None = None, epoch: int = 0
    ) -> TeacherOutputs:
        """The teachers' outputs for the batch ``inputs`` with sample indices ``index`` (None
        when the loader yields none) in ``epoch``."""


class OnlineTeachers(TeacherSource):
    """Frozen teacher modules run on every batch.

    At construction each teacher gets ``requires_grad_(False)`` and ``eval()`` (and the
    channels_last memory format when asked); these change the teacher objects themselves, which
    are not copied. Before every run, eval mode is re-asserted, so a trainer calling ``.train()``
    on a parent cannot flip a teacher's BatchNorm or Dropout.

    Args:
        teachers: the teacher modules.
        feature_paths: per teacher index, the module paths whose outputs the terms read.
        logits_selector: how to take the logits out of a teacher's output
            (:func:`kdkit.capture.select_tensor`).
        autocast_dtype: run the teachers under ``torch.autocast`` with this dtype.
        channels_last: put the teachers and 4-D inputs in ``torch.channels_last``.
        compile: ``torch.compile`` the forwards of teachers whose features no term reads.
        elide: per teacher index, the ``"module:input"`` feature paths whose module runs on zero
            tokens (a fused-linear term's lm_head: no logits are computed; :mod:`kdkit.fused`).
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        feature_paths: Mapping[int, list[str]],
        *,
        logits_selector: Selector = None,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool = False,
        elide: Mapping[int, list[str]] | None = None,
    ) -> None:
        self.teachers = list(teachers)
        for t in self.teachers:
            t.requires_grad_(False)
            t.eval()
            if channels_last:
                t.to(memory_format=torch.channels_last)
        # Read every step to re-assert eval mode: listing the modules once keeps that cheap.
        self._all_modules = [list(t.modules()) for t in self.teachers]
        self.feature_paths = [list(feature_paths.get(k, [])) for k in range(len(self.teachers))]
        elide = elide or {}
        self._captures = [
            StepCapture(t, paths, elide=elide.get(k, ()))
            for k, (t, paths) in enumerate(zip(self.teachers, self.feature_paths, strict=True))
        ]
        self.logits_selector = logits_selector
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        # A run with feature hooks calls the plain module: hooks would force recompiles.
        self._forwards: list[Callable[..., Any]] = [
            torch.compile(t) if compile else t for t in self.teachers
        ]

    @property
    def modules(self) -> list[nn.Module]:
        return self.teachers

    def outputs(
        self, inputs: Any, *, index: Tensor | None = None, epoch: int = 0, capture: bool = True
    ) -> TeacherOutputs:
        """The teachers' outputs; ``capture=False`` runs them plainly, without the feature
        captures (and so with their full logits even where a fused term elides the head)."""
        if self.channels_last:
            inputs = to_channels_last(inputs)
        logits, features = [], []
        for k, teacher in enumerate(self.teachers):
            # Reading every module's flag (in C, via map) is cheaper than eval()'s setattr on
            # each of them.
            if any(map(_TRAINING, self._all_modules[k])):
                teacher.eval()
            with torch.no_grad(), self._autocast(inputs):
                if capture and self.feature_paths[k]:
                    output, captured = self._captures[k](teacher, inputs)
                else:
                    output, captured = call_model(self._forwards[k], inputs), {}
            features.append(captured)
            logits.append(select_tensor(output, self.logits_selector))
        return TeacherOutputs(logits, features)

    def _autocast(self, inputs: Any) -> Any:
        if self.autocast_dtype is None:
            return _NO_AUTOCAST
        device = next((t.device for t in _tensors(inputs)), torch.device("cpu"))
        return torch.autocast(device.type, dtype=self.autocast_dtype)


class CachedTeacher(TeacherSource):
    """Teacher outputs read from a cache by the batch's sample indices: an object with
    ``teacher_output(index, epoch)`` (e.g. a :class:`kdkit.cache.TeacherCache`), or a
    :class:`kdkit.cache.TokenCache`, whose per-token top-k distributions
    (:class:`~kdkit.cache.TopKTokens`: top-k log-probabilities, their ids, the log tail mass)
    are the sparse target of :class:`kdkit.losses.SparseKLDivLoss`, the loss every term reading
    such a teacher must have (checked when the Distiller is built). Token sequences are
    right-padded to the batch's longest, as :func:`kdkit.data.text.collate_sequences` pads the
    inputs; the padded positions are dropped from the step's token mask."""

    def __init__(self, cache: Any, *, logits_selector: Selector = None) -> None:
        self.cache = cache
        self.logits_selector = logits_selector

    def outputs(
        self, inputs: Any, *, index: Tensor | None = None, epoch: int = 0
    ) -> TeacherOutputs:
        if index is None:
            raise ValueError(
                "this Distiller reads teacher outputs from a cache, which needs the batch's "
                "sample indices: call distiller(x, y, index=idx) with a dataset that yields "
                "(x, y, index) (wrap it in kdkit.data.IndexedDataset; kdkit.data.text's token "
                "datasets yield it)."
            )
        if isinstance(self.cache, TokenCache):
            return precomputed(self.cache.teacher_output(index))
        return precomputed(self.cache.teacher_output(index, epoch), self.logits_selector)


def check_sparse_terms(bound: Sequence[Any], source: TeacherSource | None) -> None:
    """Refuse a kdkit loss that reads dense teacher logits when the teacher is a token cache
    (``bound``: the Distiller's :class:`kdkit.term.BoundTerm` list)."""
    if not (isinstance(source, CachedTeacher) and isinstance(source.cache, TokenCache)):
        return
    for b in bound:
        dense = isinstance(b.loss, DistillationLoss) and not isinstance(b.loss, SparseKLDivLoss)
        if b.reads_teacher and (dense or not b.on_logits):
            raise ValueError(
                f"term {b.name!r} ({type(b.term.loss).__name__}) reads the teacher's "
                f"{'logits' if b.on_logits else 'features'}, but the teacher is a TokenCache, "
                "which holds the teacher's top-k log-probabilities per token; use "
                "kdkit.losses.SparseKLDivLoss for the teacher term (or run the teacher online)."
            )


def precomputed(output: Any, logits_selector: Selector = None) -> TeacherOutputs:
    """A teacher output given as data: a logits tensor, a model output, a
    :class:`~kdkit.cache.TopKTokens`, or ``{"logits": ..., "features": {path: tensor}}``."""
    if isinstance(output, TopKTokens):
        return TeacherOutputs([output], [{}], output.mask)
    if isinstance(output, Mapping) and "features" in output:
        return TeacherOutputs([select_tensor(output, "logits")], [dict(output["features"])])
    return TeacherOutputs([select_tensor(output, logits_selector)], [{}])


class Teachers:
    """The teacher side of a Distiller: a source, outputs given with the batch, the ensemble.

    Args:
        source: where outputs come from when the batch brings none (None: always given).
        weights: weights of the teachers in the ensemble (normalised to sum to 1); None is equal.
        logits_selector: how to take the logits out of a ``teacher_output`` given with a batch.
    """

    def __init__(
        self,
        source: TeacherSource | None,
        *,
        weights: Sequence[float] | None = None,
        logits_selector: Selector = None,
    ) -> None:
        self.source = source
        self.logits_selector = logits_selector
        self.weights = _check_weights(weights, len(self.modules))

    @property
    def modules(self) -> list[nn.Module]:
        return self.source.modules if self.source is not None else []

    def outputs(
        self,
        inputs: Any,
        *,
        teacher_output: Any = None,
        index: Tensor | None = None,
        epoch: int,
        capture: bool = True,
    ) -> TeacherOutputs:
        """``teacher_output`` when given, else the source's outputs for this batch
        (``capture=False``: online teachers run without their feature captures)."""
        if not capture and isinstance(self.source, OnlineTeachers):
            return self.source.outputs(inputs, capture=False)
        if teacher_output is not None:
            return precomputed(teacher_output, self.logits_selector)
        if self.source is None:
            raise ValueError(
                "this Distiller has no teacher and no teacher_output was given; pass the teacher "
                "to Distiller(...) or teacher_output=... with the batch."
            )
        return self.source.outputs(inputs, index=index, epoch=epoch)

    def ensemble(self, logits: list[Tensor], temperature: float | None) -> Tensor:
        """One teacher's logits from several (Hinton et al. 2015, §4).

        For a soft loss at temperature T, ``T · log Σ_k w_k softmax(z_k / T)``: logits whose
        softmax at T is the weighted mean of the teachers' softened probabilities. For a loss on
        raw logits (``temperature`` None, e.g. MSE), the weighted mean of the logits.
        """
        if len(logits) == 1:
            return logits[0]
        n = len(logits)
        # at least float32: bf16 teacher logits (autocast) would lose the small probabilities
        stacked = torch.stack(logits)
        stacked = stacked.to(torch.promote_types(stacked.dtype, torch.float32))
        w = self.weights if self.weights is not None else torch.full((n,), 1 / n)
        w = w.to(stacked).view(n, *([1] * (stacked.dim() - 1)))  # the logits' device and dtype
        if temperature is None:
            return (w * stacked).sum(0)
        log_p = torch.log_softmax(stacked / temperature, dim=-1)
        return temperature * torch.logsumexp(w.log() + log_p, dim=0)


class TeacherAccess:
    """The teacher side seen from an ``nn.Module`` that holds a :class:`Teachers` as
    ``teacher_side`` (and an ``epoch``) without registering the teachers as submodules, mixed
    into :class:`kdkit.Distiller`: the teacher modules, their logits for a batch, and ``.to()`` /
    ``.cuda()`` / ``.half()`` moving them with the module."""

    teacher_side: Teachers
    epoch: int

    @property
    def teacher(self) -> nn.Module | None:
        """The (first) teacher module, or None when outputs come from a cache or the batch."""
        teachers = self.teacher_side.modules
        return teachers[0] if teachers else None

    @property
    def teachers(self) -> list[nn.Module]:
        return list(self.teacher_side.modules)

    def compute_teacher_logits(self, inputs: Any) -> Tensor:
        """The teachers' logits for ``inputs`` (eval mode, no grad), several ensembled at T=1."""
        outputs = self.teacher_side.outputs(inputs, epoch=self.epoch, capture=False)
        return self.teacher_side.ensemble(outputs.logits, 1.0)

    def teacher_logits(self, inputs: Any) -> Tensor:
        """Deprecated name of :meth:`compute_teacher_logits`."""
        warnings.warn(
            "Distiller.teacher_logits() is deprecated; use compute_teacher_logits().",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.compute_teacher_logits(inputs)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Any:
        # The teachers are deliberately unregistered; they still follow .to() / .cuda() / .half().
        for t in self.teacher_side.modules:
            t._apply(fn, recurse)
        return super()._apply(fn, recurse)  # type: ignore[misc]  (nn.Module's, next in the MRO)


def source_of(
    teacher: Any,
    feature_paths: Mapping[int, list[str]],
    *,
    logits_selector: Selector,
    **options: Any,
) -> TeacherSource | None:
    """The source for ``Distiller``'s ``teacher`` argument: an ``nn.Module``, a sequence (or
    ``nn.ModuleList``) of them, a :class:`~kdkit.cache.TokenCache`, a cache with
    ``teacher_output(index, epoch)``, a :class:`TeacherSource`, or None. ``options`` go to
    :class:`OnlineTeachers`."""
    if teacher is None or isinstance(teacher, TeacherSource):
        return teacher
    if isinstance(teacher, nn.ModuleList):
        teacher = list(teacher)
    if isinstance(teacher, nn.Module):
        teacher = [teacher]
    elif hasattr(teacher, "teacher_output"):
        return CachedTeacher(teacher, logits_selector=logits_selector)
    if isinstance(teacher, Sequence) and all(isinstance(t, nn.Module) for t in teacher):
        if not teacher:
            raise ValueError("teacher is an empty list; pass at least one nn.Module or None.")
        return OnlineTeachers(teacher, feature_paths, logits_selector=logits_selector, **options)
    raise TypeError(
        f"teacher must be an nn.Module, a list of nn.Modules, a TeacherCache, a TokenCache, a "
        f"kdkit.teachers.TeacherSource or None, got {type(teacher).__name__}."
    )


def to_channels_last(inputs: Any) -> Any:
    """``inputs`` with every 4-D tensor in ``torch.channels_last`` memory format."""
    if isinstance(inputs, Tensor):
        return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs
    if isinstance(inputs, Mapping):
        return {k: to_channels_last(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_channels_last(v) for v in inputs)
    return inputs


def _check_weights(weights: Sequence[float] | None, n: int) -> Tensor | None:
    if weights is None:
        return None
    w = [float(v) for v in weights]
    if len(w) != n:
        raise ValueError(
            f"teacher_weights has {len(w)} entries but there are {n} teachers; give one weight "
            "per teacher."
        )
    if any(v < 0 or not math.isfinite(v) for v in w) or sum(w) <= 0:
        raise ValueError(f"teacher_weights must be finite, >= 0 and not all 0, got {w}.")
    return torch.tensor(w) / sum(w)


def _tensors(inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    if isinstance(values, tuple | list) or isinstance(inputs, Mapping):
        return [v for v in values if isinstance(v, Tensor)]
    return []
