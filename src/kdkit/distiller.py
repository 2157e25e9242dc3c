"""The Distiller: a student, frozen teacher(s) and weighted loss terms in one ``nn.Module``.

One forward on a batch returns the total loss, every term's value (detached, for logging) and the
student's output. The same object also offers the hooks API of Intel Neural Compressor
(``on_train_begin`` / ``on_after_compute_loss`` / ``on_epoch_end``) for hand-written loops.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdkit.adapters import build_adapter, probe_shapes
from kdkit.batch import call_model
from kdkit.capture import FeatureCapture, resolve_module, select_tensor
from kdkit.functional import shared_log_softmax

Selector = int | str | Callable[[Any], Tensor] | None
LOGITS = "logits"


@dataclass
class Term:
    """One weighted loss term of a :class:`Distiller`, and what it reads.

    Args:
        loss: called as ``loss(student_value, teacher_value)``, with ``target`` appended when the
            term reads labels, or as ``loss(student_value, target)`` when ``teacher`` is None.
        weight: the term's weight in the total loss (>= 0). The other fields are keyword-only.
        student: ``"logits"`` or a module path (or a list of paths) of the student to read.
        teacher: ``"logits"``, a module path (or list of paths) of the teacher, or None for a term
            that only reads the student and the labels (e.g. cross-entropy on hard labels).
        name: the key under which the term is logged; derived from the loss class when None.
        adapter: ``None`` (features are compared as they are), ``"identity"``, ``"linear"``,
            ``"conv"`` or ``"auto"``: a learned student-side projection to the teacher's shape.
            Anything but None or identity needs ``example_input`` on the Distiller to probe shapes.
        target: whether the loss also takes the labels; defaults to ``loss.needs_target``.
        teacher_index: which teacher a feature term reads when there are several (default 0).
    """

    loss: Callable[..., Tensor]
    weight: float = 1.0
    _: KW_ONLY
    student: str | Sequence[str] = LOGITS
    teacher: str | Sequence[str] | None = LOGITS
    name: str | None = None
    adapter: str | None = None
    target: bool | None = None
    teacher_index: int = 0

    @property
    def student_paths(self) -> list[str]:
        return _paths(self.student)

    @property
    def teacher_paths(self) -> list[str]:
        return _paths(self.teacher)

    @property
    def reads_target(self) -> bool:
        return (
            bool(getattr(self.loss, "needs_target", False)) if self.target is None else self.target
        )


@dataclass
class DistillerOutput:
    """What one Distiller step returns."""

    loss: Tensor
    terms: dict[str, Tensor]
    student_output: Any
    logits: Tensor
    teacher_logits: list[Tensor] = field(default_factory=list)


class _Step(NamedTuple):
    """What the terms of one step read."""

    logits: Tensor
    student_features: Mapping[str, Tensor]
    teacher_logits: list[Tensor]
    teacher_features: list[dict[str, Tensor]]
    target: Tensor | None
    mask: Tensor | None


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def _paths(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None or spec == LOGITS:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _default_name(loss: Callable[..., Tensor]) -> str:
    cls = type(loss).__name__ if isinstance(loss, nn.Module) else getattr(loss, "__name__", "term")
    cls = cls.removesuffix("Loss") or cls
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", cls).lower()


def _tensors(inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    if isinstance(values, tuple | list) or isinstance(inputs, Mapping):
        return [v for v in values if isinstance(v, Tensor)]
    return []


def _to_channels_last(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs
    if isinstance(inputs, Mapping):
        return {k: _to_channels_last(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(_to_channels_last(v) for v in inputs)
    return inputs


class Distiller(nn.Module):
    """Student + frozen teacher(s) + weighted loss terms.

    ``distiller(inputs, target)`` runs the student (capturing the features its terms read), runs
    every teacher in eval mode under ``torch.no_grad()`` (or takes ``teacher_output`` given with
    the batch, or reads a teacher-output cache by sample ``index``), and returns a
    :class:`DistillerOutput` with ``loss = Σ weight_i · term_i``.

    The teacher is frozen: its parameters get ``requires_grad=False``, it is put back in eval mode
    on every forward (a trainer calling ``.train()`` on the parent cannot flip its BatchNorm or
    Dropout), and it is not registered as a submodule, so it is not in ``parameters()``, not in
    ``state_dict()`` and not wrapped by DDP; ``.to()`` / ``.cuda()`` still move it.

    With several teachers, logit terms see the weighted average of the teachers' softened
    probabilities at the term's temperature T (Hinton et al. 2015, §4): the teacher logits
    handed to the loss are ``T · log Σ_k w_k softmax(z_k / T)``, whose softmax at T is exactly
    that average.

    Args:
        student: the model to train; ``distiller.student`` stays the plain module (no hooks
            outside a forward, no adapters), ready to ship.
        teacher: an ``nn.Module``, a sequence of them, an object with ``teacher_output(index,
            epoch)`` (a :class:`kdkit.cache.TeacherCache`), or None when teacher outputs always
            come with the batch.
        terms: a sequence of :class:`Term`, or a mapping name -> Term (names from config keys).
        teacher_weights: weights of the teachers' probabilities (normalised to sum to 1).
        logits: selector for the logits in the models' outputs: None (tensor; first element of a
            tuple; ``"logits"`` key or attribute), an index, a key / attribute name, or a callable.
        teacher_logits: selector for the teachers' outputs, when it differs from ``logits``.
        example_input: one input batch, used once to probe feature shapes for adapters.
        check_finite: raise when a term is NaN/Inf, naming it. On the CPU every step; on an
            accelerator the flags stay on the device and are read every ``check_finite_every``
            steps, so steps are not held up by a host sync.
        check_finite_every: steps between reads of the flags on an accelerator.
        autocast_dtype: run the teachers under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); the soft losses upcast logits to float32 before the softmax.
        channels_last: put student and teachers in ``torch.channels_last`` memory format and
            convert 4-D inputs, the faster layout for convolutions on GPU.
        compile: ``torch.compile`` the student's and teachers' forwards (logit terms only:
            per-step feature hooks would force recompiles). ``distiller.student`` stays the
            plain module.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | Any | None = None,
        terms: Sequence[Term] | Mapping[str, Term] = (),
        *,
        teacher_weights: Sequence[float] | None = None,
        logits: Selector = None,
        teacher_logits: Selector = None,
        example_input: Any = None,
        check_finite: bool = True,
        check_finite_every: int = 100,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}.")
        self.student = student
        self._teachers, self._cache = self._split_teacher(teacher)
        for t in self._teachers:
            t.requires_grad_(False)
            t.eval()
        # Read every step to re-assert eval mode: listing the modules once keeps that cheap.
        self._teacher_modules = [list(t.modules()) for t in self._teachers]
        self._teacher_weights = self._check_teacher_weights(teacher_weights, len(self._teachers))
        self.logits_selector = logits
        self.teacher_logits_selector = teacher_logits if teacher_logits is not None else logits
        self.check_finite = check_finite
        if not isinstance(check_finite_every, int) or check_finite_every < 1:
            raise ValueError(f"check_finite_every must be an int >= 1, got {check_finite_every!r}.")
        self.check_finite_every = check_finite_every
        self._finite_flags: Tensor | None = None
        self._unchecked_steps = 0
        self.terms = self._name_terms(terms)
        if not self.terms:
            raise ValueError(
                "Distiller needs at least one term, got none; e.g. "
                "terms=[Term(KLDivLoss(temperature=4.0))]."
            )
        self._takes_mask = {n: _takes_keyword(t.loss, "mask") for n, t in self.terms.items()}
        self._student_feature_paths = list(
            dict.fromkeys(p for t in self.terms.values() for p in t.student_paths)
        )
        self._teacher_feature_paths = [
            list(
                dict.fromkeys(
                    p for t in self.terms.values() if t.teacher_index == k for p in t.teacher_paths
                )
            )
            for k in range(len(self._teachers))
        ]
        self.losses = nn.ModuleDict(
            {n: t.loss for n, t in self.terms.items() if isinstance(t.loss, nn.Module)}
        )
        self._check_terms()
        self.adapters = self._build_adapters(example_input)
        self.epoch = 0
        self._persistent_capture: FeatureCapture | None = None
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        if channels_last:
            for model in (self.student, *self._teachers):
                model.to(memory_format=torch.channels_last)
        # Plain attributes, not submodules: a second registration would duplicate the student's
        # weights in every state_dict.
        object.__setattr__(self, "_student_fn", self.student)
        self._teacher_fns: list[Callable[..., Any]] = list(self._teachers)
        if compile:
            if self._student_feature_paths or any(t.teacher_paths for t in self.terms.values()):
                raise ValueError(
                    "compile=True supports logit terms only; feature terms add hooks on every "
                    "step, which would force recompiles. Drop compile or the feature terms."
                )
            object.__setattr__(self, "_student_fn", torch.compile(self.student))
            self._teacher_fns = [torch.compile(t) for t in self._teachers]

    @classmethod
    def from_config(
        cls,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | Any | None,
        config: str | os.PathLike | Mapping[str, Any],
        *,
        context: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Distiller:
        """A Distiller whose terms come from a distill config, as ``kdkit distill`` builds them.

        ``config`` is a shipped method name (``"kd"``, ``"dkd"``, ``"at"``, ...), a YAML file
        or a mapping with a ``terms`` mapping of ``_target_: kdkit.Term`` configs (see
        :mod:`kdkit.config`); ``options`` are the other keyword arguments of ``Distiller``.
        """
        from kdkit.config import load_distill_config, terms_from_config

        terms = terms_from_config(load_distill_config(config, context))
        return cls(student, teacher, terms, **options)

    # ----------------------------------------------------------------- construction helpers
    @staticmethod
    def _split_teacher(teacher: Any) -> tuple[list[nn.Module], Any]:
        if teacher is None:
            return [], None
        if isinstance(teacher, nn.ModuleList):
            teacher = list(teacher)
        if isinstance(teacher, nn.Module):
            return [teacher], None
        if hasattr(teacher, "teacher_output"):
            return [], teacher
        if isinstance(teacher, Sequence) and all(isinstance(t, nn.Module) for t in teacher):
            if not teacher:
                raise ValueError("teacher is an empty list; pass at least one nn.Module or None.")
            return list(teacher), None
        raise TypeError(
            f"teacher must be an nn.Module, a list of nn.Modules, a TeacherCache or None, got "
            f"{type(teacher).__name__}."
        )

    @staticmethod
    def _check_teacher_weights(weights: Sequence[float] | None, n: int) -> Tensor | None:
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

    @staticmethod
    def _name_terms(terms: Sequence[Term] | Mapping[str, Term]) -> dict[str, Term]:
        items = list(terms.items()) if isinstance(terms, Mapping) else [(None, t) for t in terms]
        named: dict[str, Term] = {}
        for key, term in items:
            if not isinstance(term, Term):
                raise TypeError(
                    f"terms must hold kdkit.Term objects, got {type(term).__name__}; wrap the "
                    "loss: Term(loss, weight=...)."
                )
            name = key or term.name or _default_name(term.loss)
            base, i = name, 1
            while name in named:
                i += 1
                name = f"{base}_{i}"
            named[name] = term
        return named

    def _check_terms(self) -> None:
        for name, term in self.terms.items():
            w = term.weight
            if not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"term {name!r} has weight {w!r}; weights must be finite numbers >= 0. "
                    "To turn a term off use weight=0."
                )
            if term.adapter not in (None, "identity", "linear", "conv", "auto"):
                raise ValueError(
                    f"term {name!r} has adapter {term.adapter!r}; allowed: None, 'identity', "
                    "'linear', 'conv', 'auto'."
                )
            n_teachers = max(len(self._teachers), 1)
            if term.teacher_paths and not 0 <= term.teacher_index < n_teachers:
                raise ValueError(
                    f"term {name!r} reads teacher_index={term.teacher_index} but there are "
                    f"{n_teachers} teacher(s); use an index in 0..{n_teachers - 1}."
                )
            if (term.student == LOGITS) != (term.teacher in (LOGITS, None)):
                raise ValueError(
                    f"term {name!r} compares student {term.student!r} with teacher "
                    f"{term.teacher!r}; a term reads logits on both sides or features on both "
                    "sides."
                )
            sp, tp = term.student_paths, term.teacher_paths
            if sp and len(sp) != len(tp):
                raise ValueError(
                    f"term {name!r} pairs {len(sp)} student layers {sp} with {len(tp)} teacher "
                    f"layers {tp}; give the same number on both sides (kdkit.capture.map_layers "
                    "builds such pairs)."
                )
            for path in sp:
                resolve_module(self.student, path)
            if self._teachers:
                for path in tp:
                    resolve_module(self._teachers[term.teacher_index], path)

    def _build_adapters(self, example_input: Any) -> nn.ModuleDict:
        adapters = nn.ModuleDict()
        # "identity" compares features as they are: no module, nothing to probe.
        wanted = {
            n: t
            for n, t in self.terms.items()
            if t.adapter not in (None, "identity") and t.student_paths
        }
        if not wanted:
            return adapters
        if example_input is None:
            names = sorted(wanted)
            raise ValueError(
                f"terms {names} ask for learned adapters, whose sizes are probed with one dry-run "
                "forward; pass example_input=<one input batch> to Distiller."
            )
        if not self._teachers:
            raise ValueError(
                "adapters are sized by probing the teacher, but this Distiller has no teacher "
                "module; build the Distiller with the teacher (or use adapter=None)."
            )
        for name, term in wanted.items():
            teacher = self._teachers[term.teacher_index] if self._teachers else None
            s_shapes = probe_shapes(self.student, term.student_paths, example_input)
            t_shapes = (
                probe_shapes(teacher, term.teacher_paths, example_input)
                if teacher is not None
                else {}
            )
            for i, (sp, tp) in enumerate(zip(term.student_paths, term.teacher_paths, strict=True)):
                adapters[f"{name}__{i}"] = build_adapter(
                    term.adapter,
                    s_shapes.get(sp),
                    t_shapes.get(tp),
                    student_name=f"student.{sp}",
                    teacher_name=f"teacher.{tp}",
                )
        like = next(self.student.parameters(), None)
        return adapters if like is None else adapters.to(like.device, like.dtype)

    # ----------------------------------------------------------------------------- module API
    @property
    def teacher(self) -> nn.Module | None:
        """The (first) teacher module, or None when outputs come from a cache or the batch."""
        return self._teachers[0] if self._teachers else None

    @property
    def teachers(self) -> list[nn.Module]:
        return list(self._teachers)

    def teacher_logits(self, inputs: Any) -> Tensor:
        """The teachers' logits for ``inputs`` (eval mode, no grad), several ensembled at T=1."""
        outputs, _ = self._run_teachers(inputs)
        return self._ensemble(
            [select_tensor(o, self.teacher_logits_selector) for o in outputs], 1.0
        )

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Distiller:
        # The teachers are deliberately unregistered; they still follow .to() / .cuda() / .half().
        for t in self._teachers:
            t._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(
        self,
        inputs: Any,
        target: Tensor | None = None,
        *,
        teacher_output: Any = None,
        index: Tensor | None = None,
        epoch: int | None = None,
        mask: Tensor | None = None,
    ) -> DistillerOutput:
        """Run the student and the teacher(s) on ``inputs`` and compute the weighted loss.

        Args:
            inputs: a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``).
            target: labels, for terms that read them.
            teacher_output: precomputed teacher output for this batch (logits tensor, a model
                output, or ``{"logits": ..., "features": {path: tensor}}``); skips the teacher.
            index: sample indices, to read a teacher-output cache.
            epoch: which cached view to read (defaults to the epoch counted by on_epoch_end).
            mask: for token logits ``[B, L, C]`` and token states ``[B, L, D]``, which tokens
                count (bool ``[B, L]``, e.g. the attention mask); handed to every term whose
                loss takes ``mask``.
        """
        if self.channels_last:
            inputs = _to_channels_last(inputs)
        # Teacher first, as a hand-written loop does: measured ~5% faster per step on CPU than
        # running it after the student (benchmarks/overhead.py).
        teacher = self._teacher(inputs, teacher_output, index, epoch)
        paths = self._student_feature_paths
        if paths:
            with FeatureCapture(self.student, paths) as cap:
                student_output = call_model(self.student, inputs)
            features = dict(cap.features)
        else:
            student_output = call_model(self._student_fn, inputs)
            features = {}
        return self._compute(student_output, features, target, teacher, mask)

    # ------------------------------------------------------------------------ hooks API (INC)
    def on_train_begin(self) -> None:
        """Call before the first batch of a hand-written loop: attaches the student's hooks."""
        self.close()
        for t in self._teachers:
            t.eval()
        paths = self._student_feature_paths
        if paths:
            self._persistent_capture = FeatureCapture(self.student, paths)

    def on_after_compute_loss(
        self,
        inputs: Any,
        student_output: Any,
        student_loss: Tensor,
        teacher_output: Any = None,
        *,
        target: Tensor | None = None,
        index: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Call after your own loss: returns ``student_loss + Σ weight_i · term_i``.

        Runs the teacher on ``inputs`` unless ``teacher_output`` is given (or a cache is set and
        ``index`` is given). The last terms are kept in ``self.last_terms`` for logging.
        """
        if self._student_feature_paths and self._persistent_capture is None:
            raise RuntimeError(
                "this Distiller reads student features, which are captured by hooks that "
                "on_train_begin() attaches; call distiller.on_train_begin() before the loop."
            )
        features = self._persistent_capture.features if self._persistent_capture else {}
        teacher = self._teacher(inputs, teacher_output, index, None)
        out = self._compute(student_output, features, target, teacher, mask)
        self.last_terms = out.terms
        return student_loss + out.loss

    def on_epoch_end(self) -> None:
        """Call at the end of every epoch (advances the epoch used to read cached views)."""
        self.epoch += 1

    def close(self) -> None:
        """Remove any hooks this Distiller holds on the student (idempotent)."""
        if self._persistent_capture is not None:
            self._persistent_capture.close()
            self._persistent_capture = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy or pickle does not take the hooks API's capture along (its hooks arrive inert);
        # call on_train_begin() on the copy to train with it.
        state = super().__getstate__()
        return {**state, "_persistent_capture": None}

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ internals

    def _run_teachers(self, inputs: Any) -> tuple[list[Any], list[dict[str, Tensor]]]:
        outputs, features = [], []
        if self.channels_last:
            inputs = _to_channels_last(inputs)
        for k, teacher in enumerate(self._teachers):
            # Reading every module's flag is cheaper than eval()'s setattr on each of them.
            if any(m.training for m in self._teacher_modules[k]):
                teacher.eval()
            paths = self._teacher_feature_paths[k]
            with torch.no_grad(), self._teacher_autocast(inputs):
                if paths:
                    with FeatureCapture(teacher, paths) as cap:
                        outputs.append(call_model(teacher, inputs))
                    features.append(dict(cap.features))
                else:
                    outputs.append(call_model(self._teacher_fns[k], inputs))
                    features.append({})
        return outputs, features

    def _teacher_autocast(self, inputs: Any) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next((t.device for t in _tensors(inputs)), torch.device("cpu"))
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _teacher_side(
        self, inputs: Any, teacher_output: Any, index: Tensor | None, epoch: int | None
    ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        if teacher_output is None and self._cache is not None:
            if index is None:
                raise ValueError(
                    "this Distiller reads teacher outputs from a cache, which needs the batch's "
                    "sample indices: call distiller(x, y, index=idx) with a dataset that yields "
                    "(x, y, index) (wrap it in kdkit.data.IndexedDataset)."
                )
            teacher_output = self._cache.teacher_output(
                index, self.epoch if epoch is None else epoch
            )
        if teacher_output is not None:
            if isinstance(teacher_output, Mapping) and "features" in teacher_output:
                logits = select_tensor(teacher_output, LOGITS)
                return [logits], [dict(teacher_output["features"])]
            return [select_tensor(teacher_output, self.teacher_logits_selector)], [{}]
        if not self._teachers:
            raise ValueError(
                "this Distiller has no teacher and no teacher_output was given; pass the teacher "
                "to Distiller(...) or teacher_output=... with the batch."
            )
        outputs, features = self._run_teachers(inputs)
        return [select_tensor(o, self.teacher_logits_selector) for o in outputs], features

    def _ensemble(self, teacher_logits: list[Tensor], temperature: float | None) -> Tensor:
        """One teacher's logits from several: for soft losses (a temperature T) the logits whose
        softmax at T is the weighted mean of the teachers' softened probabilities; for losses
        on raw logits (no temperature, e.g. MSE) the weighted mean of the logits."""
        if len(teacher_logits) == 1:
            return teacher_logits[0]
        n = len(teacher_logits)
        # float32: bf16 teacher logits (autocast) would lose the small probabilities here.
        stacked = torch.stack([t.float() for t in teacher_logits])
        w = self._teacher_weights if self._teacher_weights is not None else torch.full((n,), 1 / n)
        w = w.to(stacked.device).view(n, *([1] * (stacked.dim() - 1)))
        if temperature is None:
            return (w * stacked).sum(0)
        log_p = torch.log_softmax(stacked / temperature, dim=-1)
        return temperature * torch.logsumexp(w.log() + log_p, dim=0)

    def _teacher(
        self, inputs: Any, teacher_output: Any, index: Tensor | None, epoch: int | None
    ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        if not any(t.teacher is not None for t in self.terms.values()):
            return [], []
        return self._teacher_side(inputs, teacher_output, index, epoch)

    def _compute(
        self,
        student_output: Any,
        student_features: Mapping[str, Tensor],
        target: Tensor | None,
        teacher: tuple[list[Tensor], list[dict[str, Tensor]]],
        mask: Tensor | None,
    ) -> DistillerOutput:
        logits = select_tensor(student_output, self.logits_selector)
        t_logits, t_features = teacher
        for k, t in enumerate(t_logits):
            if t.shape[-1] != logits.shape[-1]:
                raise ValueError(
                    f"teacher {k} predicts {t.shape[-1]} classes (logits shape {tuple(t.shape)}) "
                    f"but the student predicts {logits.shape[-1]} (logits shape "
                    f"{tuple(logits.shape)}); give both models the same number of classes."
                )
        step = _Step(logits, student_features, t_logits, t_features, target, mask)
        values: dict[str, Tensor] = {}
        weighted = []
        with shared_log_softmax():
            for name, term in self.terms.items():
                value = self._term(name, term, step)
                values[name] = value.detach()
                weighted.append(value if term.weight == 1 else term.weight * value)
        total = weighted[0] if len(weighted) == 1 else torch.stack(weighted).sum()
        if self.check_finite:
            self._check_finite(total, values)
        return DistillerOutput(total, values, student_output, logits, t_logits)

    def _check_finite(self, total: Tensor, values: dict[str, Tensor]) -> None:
        if total.device.type == "cpu":
            if not torch.isfinite(total):
                self._raise_nonfinite([bool(torch.isfinite(v).all()) for v in values.values()])
            return
        # On an accelerator, reading a flag waits for the device: keep the flags there and read
        # them once every `check_finite_every` steps.
        flags = torch.stack([torch.isfinite(v).all() for v in values.values()])
        self._finite_flags = flags if self._finite_flags is None else self._finite_flags & flags
        self._unchecked_steps += 1
        if self._unchecked_steps >= self.check_finite_every:
            ok, self._finite_flags, self._unchecked_steps = self._finite_flags.tolist(), None, 0
            if not all(ok):
                self._raise_nonfinite(ok, steps=self.check_finite_every)

    def _raise_nonfinite(self, ok: list[bool], steps: int = 1) -> None:
        name = next((n for n, fine in zip(self.terms, ok, strict=True) if not fine), "the sum")
        when = "" if steps == 1 else f" in one of the last {steps} steps"
        raise FloatingPointError(
            f"term {name!r} was NaN/Inf{when}; lower the learning rate, check the inputs for "
            "NaN/Inf, or raise the temperature of a soft term."
        )

    def _term(self, name: str, term: Term, step: _Step) -> Tensor:
        args = self._term_inputs(name, term, step)
        kwargs = {}
        if term.reads_target:
            if step.target is None:
                raise ValueError(
                    f"term {name!r} reads labels but target is None; call "
                    "distiller(inputs, target)."
                )
            # Losses that do not require labels take them as an optional keyword (e.g.
            # KLDivLoss(ignore_index=...)), after their mask argument.
            if term.teacher is None or getattr(term.loss, "needs_target", False):
                args.append(step.target)
            else:
                kwargs["target"] = step.target
        if step.mask is not None and self._takes_mask[name]:
            kwargs["mask"] = step.mask
        try:
            value = term.loss(*args, **kwargs)
        except ValueError as e:
            raise ValueError(f"term {name!r}: {e}") from e
        return value

    def _term_inputs(self, name: str, term: Term, step: _Step) -> list[Any]:
        if term.student == LOGITS:
            if term.teacher is None:
                return [step.logits]
            temperature = getattr(term.loss, "temperature", None)
            return [step.logits, self._ensemble(step.teacher_logits, temperature)]
        s_vals, t_vals = [], []
        features = step.teacher_features
        available = features[term.teacher_index] if term.teacher_index < len(features) else {}
        for i, (sp, tp) in enumerate(zip(term.student_paths, term.teacher_paths, strict=True)):
            if tp not in available:
                raise ValueError(
                    f"term {name!r} reads teacher feature {tp!r}, which the teacher output does "
                    f"not contain (it has {sorted(available)}); run the teacher online or cache "
                    "that feature."
                )
            s = step.student_features[sp]
            key = f"{name}__{i}"
            if key in self.adapters:
                s = self.adapters[key](s)
            s_vals.append(s)
            t_vals.append(available[tp])
        if isinstance(term.student, str):
            return [s_vals[0], t_vals[0]]
        return [s_vals, t_vals]
