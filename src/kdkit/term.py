"""What a term of a :class:`kdkit.Distiller` reads and how it is weighted, and what a step returns.

A :class:`Term` is a loss with a weight and the names of what it reads. When the Distiller is
built, each term is bound once (:func:`bind_terms`) to a :class:`BoundTerm`: its loss as a
:class:`~kdkit.contract.DistillationLoss` (a plain callable is wrapped in :class:`CallableLoss`,
whose contract comes from the Term's fields) and the flags a step reads, so that a step only
looks them up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor, nn

from kdkit.adapters import ADAPTER_KINDS, build_adapter, probe_shapes
from kdkit.cache.tokens import TopKTokens
from kdkit.capture import INPUT_MARKER, parse_address, resolve_module
from kdkit.contract import DistillationLoss
from kdkit.losses import AttentionLoss, FusedLinearJSDLoss
from kdkit.vocab import VocabMap

if TYPE_CHECKING:
    from kdkit.teachers import TeacherOutputs

LOGITS = "logits"
LM_HEAD_INPUT = "lm_head" + INPUT_MARKER
"""What a fused-linear term reads on both sides unless told otherwise: the input of the module
named ``lm_head`` (Hugging Face causal LMs), multiplied there by that module's weight."""

Ensemble = Callable[[list[Tensor], "float | None"], Tensor]


@dataclass
class Term:
    """One weighted loss term of a :class:`~kdkit.Distiller`, and what it reads.

    The Distiller reads the loss's declarations (:class:`kdkit.contract.DistillationLoss`), never
    its signature, and calls it as ``loss(student, teacher, target=..., mask=...,
    num_items_in_batch=...)`` (each keyword only where the term reads it), or as
    ``loss(student, target, mask=...)`` when the loss reads no teacher.

    Any other callable (a plain function, ``torch.nn.CrossEntropyLoss()``) works too: the
    Distiller wraps it in :class:`CallableLoss`, whose contract comes from these fields:
    it reads the teacher unless ``teacher=None`` (then it is called ``loss(student, target)``),
    gets ``target=`` when ``target=True`` (or the callable has ``needs_target = True``), gets
    ``mask=`` only when ``mask=True`` (or it has ``takes_mask = True``), and is ensembled over
    several teachers at its ``temperature`` attribute if it has one. It never gets
    ``num_items_in_batch`` (a step given one refuses it; subclass ``DistillationLoss`` instead).

    Args:
        loss: a :class:`~kdkit.contract.DistillationLoss` or any callable returning a scalar.
        weight: the term's weight in the total loss (>= 0). The other fields are keyword-only.
        student: ``"logits"`` or an address (or a list of them) of what the student's term
            reads: a module path (``"bert.encoder.layer.3"``), an item of that module's output
            (``"...attention.self[1]"``, ``'...["key"]'``), the module's input
            (``"bert.encoder.layer.3:input"``) or a field of the model's output
            (``"output.hidden_states[2]"``, Hugging Face indices; ``"output.attentions[-1]"``).
            See :func:`kdkit.capture.parse_address`.
        teacher: ``"logits"``, an address (or list of them) of the teacher, or None for a term
            that only reads the student and the labels (e.g. cross-entropy on hard labels).

            A :class:`~kdkit.losses.FusedLinearJSDLoss` term reads ``"lm_head:input"`` of both
            models for ``"logits"`` (another head: ``student="head:input"``): it gets that
            module's input (the last hidden states) and its weight, and the Distiller calls
            both models so that the head runs on zero tokens, so no ``[B, L, V]`` logits exist
            (see :mod:`kdkit.fused`). Its ``target`` are labels aligned with the hidden states
            (``labels[:, t]`` is the token after position ``t``, shifted once, as
            :mod:`kdkit.data.text` yields them), and ``ignore_index`` drops tokens.
        name: the key under which the term is logged; derived from the loss class when None.
        adapter: ``None`` (features are compared as they are), ``"identity"``, ``"linear"``,
            ``"conv"`` or ``"auto"``: a learned student-side projection to the teacher's shape.
            Anything but None or identity needs ``example_input`` on the Distiller to probe shapes.
        target: whether the loss also takes the labels; defaults to ``loss.needs_target``, or
            True for a kdkit loss with ``ignore_index`` set (then a step without labels is
            refused, since the ignored tokens would count).
        teacher_index: which teacher a feature term reads when there are several (default 0).
        mask: whether the term gets the step's token ``mask=`` (``[B, L]``); None: when the
            loss ``takes_mask`` and the student tensor it reads is token-level (leading dims
            ``[B, L]``, or an attention map ``[B, H, L, L]``), so sequence-level terms (``[B, C]``
            logits) never get it; False opts out; True always hands it over (refused for a loss
            that declares ``takes_mask = False``).
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
    mask: bool | None = None

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


class StepInputs(NamedTuple):
    """What the terms of one step read. ``shared_logits`` are the student's logits on the rows
    the teachers' logits hold too (the student's logits themselves unless a
    :class:`~kdkit.vocab.VocabMap` aligns two vocabularies); terms that read the teacher compare
    those, terms of the student alone read the full ``logits``."""

    logits: Tensor
    shared_logits: Tensor
    student_features: Mapping[str, Tensor]
    teacher_logits: list[Tensor]
    teacher_features: list[dict[str, Tensor]]
    target: Tensor | None
    mask: Tensor | None
    num_items_in_batch: int | Tensor | None
    vocab_map: VocabMap | None = None

    @classmethod
    def of(
        cls,
        logits: Tensor,
        student_features: Mapping[str, Tensor],
        teacher: TeacherOutputs,
        target: Tensor | None,
        mask: Tensor | None,
        num_items_in_batch: int | Tensor | None,
        vocab_map: VocabMap | None = None,
    ) -> StepInputs:
        """The record, once the teachers are checked to predict the student's classes (or
        their logits are brought onto one vocabulary by ``vocab_map``), with the step's
        ``mask`` narrowed to the tokens the teachers have outputs for."""
        teacher_logits, features = teacher.logits, teacher.features
        if teacher.mask is not None:
            mask = teacher.mask if mask is None else teacher.mask & mask.bool()
        shared = logits
        if any(isinstance(t, TopKTokens) for t in teacher_logits):
            shared = _sparse_shared(logits, teacher_logits, vocab_map)
        elif vocab_map is not None:
            pairs = [vocab_map(logits, t) for t in teacher_logits]
            if pairs:
                shared, teacher_logits = pairs[0][0], [t for _, t in pairs]
        for k, t in enumerate(teacher_logits):
            if _classes(t) != shared.shape[-1]:
                raise ValueError(
                    f"teacher {k} predicts {_classes(t)} classes ({_describe(t)}) "
                    f"but the student predicts {logits.shape[-1]} (logits shape "
                    f"{tuple(logits.shape)}); give both models the same number of classes. For "
                    "language models whose lm_head is padded past the tokenizer's size, or whose "
                    "tokenizers differ, pass Distiller(vocab_map=kdkit.vocab.VocabMap.padded("
                    "len(tokenizer))) or VocabMap.from_tokenizers(student_tok, teacher_tok)."
                )
        return cls(
            logits,
            shared,
            student_features,
            teacher_logits,
            features,
            target,
            mask,
            num_items_in_batch,
            vocab_map,
        )


def _classes(teacher: Tensor | TopKTokens) -> int:
    return teacher.vocab_size if isinstance(teacher, TopKTokens) else teacher.shape[-1]


def _describe(teacher: Tensor | TopKTokens) -> str:
    if isinstance(teacher, TopKTokens):
        return f"top-k tokens of a vocabulary of {teacher.vocab_size}"
    return f"logits shape {tuple(teacher.shape)}"


def _sparse_shared(
    logits: Tensor, teachers: list[Tensor | TopKTokens], vocab_map: VocabMap | None
) -> Tensor:
    """The student's logits a sparse (top-k) teacher is compared with: all of them, or the
    first ``vocab_map.size`` for a padded head; the tokens of both must line up."""
    (cached,) = teachers
    if tuple(cached.values.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"the cached teacher tokens cover {tuple(cached.values.shape[:-1])} positions but "
            f"the student's logits {tuple(logits.shape[:-1])}; batch the sequences padded to "
            "the longest of the batch (kdkit.data.text.collate_sequences), as the cache pads "
            "them, and pass their index."
        )
    if vocab_map is None:
        return logits
    if not vocab_map.is_prefix:
        raise ValueError(
            f"{vocab_map!r} maps two tokenizers' vocabularies, but the cached top-k ids are the "
            "teacher's; a token cache works with one tokenizer (VocabMap.padded(...) at most)."
        )
    return logits[..., : vocab_map.size]


class CallableLoss:
    """A callable that is not a :class:`~kdkit.contract.DistillationLoss`, with the contract its
    :class:`Term` declares (see there). Calls pass straight through; nothing is registered, so a
    wrapped ``nn.Module`` keeps its place in the Distiller's ``losses`` and ``state_dict``."""

    per_sample = False  # its mean cannot take a whole batch's normaliser

    def __init__(self, fn: Callable[..., Tensor], term: Term) -> None:
        self.fn = fn
        self.needs_target = term.reads_target
        self.reads_teacher = term.teacher is not None
        self.takes_mask = bool(getattr(fn, "takes_mask", False)) if term.mask is None else term.mask
        self.temperature: float | None = getattr(fn, "temperature", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **kwargs)


@dataclass(frozen=True)
class BoundTerm:
    """A term as a step runs it: its contract read once, at construction."""

    name: str
    term: Term
    loss: DistillationLoss | CallableLoss
    reads_teacher: bool
    reads_target: bool
    gets_mask: bool
    gets_num_items: bool
    on_logits: bool
    # (student path, teacher path, adapter key or None) per compared layer
    layers: tuple[tuple[str, str, str | None], ...]
    # a fused-linear term: the lm_head modules (student, teacher) whose weights it reads, set by
    # kdkit.fused.attach_heads once the models are known
    lm_head: bool = False
    heads: tuple[nn.Module, nn.Module] | None = None

    @property
    def wrapped(self) -> bool:
        return isinstance(self.loss, CallableLoss)

    def value(
        self, step: StepInputs, ensemble: Ensemble, adapters: Mapping[str, nn.Module]
    ) -> Tensor:
        """The term's unweighted value in a step; ``ensemble(teacher_logits, temperature)``
        makes one teacher of several, ``adapters`` are the Distiller's by key."""
        if self.on_logits:
            student: Any = step.logits
            teacher: Any = None
            if self.reads_teacher:
                student = step.shared_logits
                teacher = ensemble(step.teacher_logits, self.loss.temperature)
        else:
            student, teacher = self._features(step, adapters)
        kwargs: dict[str, Any] = {}
        if self.gets_mask and step.mask is not None:
            if self.term.mask or _fits(step.mask, student):
                kwargs["mask"] = step.mask
        if step.num_items_in_batch is not None:
            if self.gets_num_items:
                kwargs["num_items_in_batch"] = step.num_items_in_batch
            elif self.wrapped:
                raise ValueError(
                    f"term {self.name!r} wraps {type(self.term.loss).__name__}, which is not a "
                    "kdkit.contract.DistillationLoss, so it cannot take num_items_in_batch (its "
                    "mean would cover this call only); use a kdkit loss or a DistillationLoss "
                    "subclass, or drop num_items_in_batch."
                )
        args = [student, teacher] if self.reads_teacher else [student]
        if self.lm_head:
            w_s, w_t = self._head_weights(step.vocab_map)
            # a teacher run under autocast may hand its head half-precision hidden states
            args = [student, w_s, teacher.to(w_t.dtype), w_t]
        if self.reads_target:
            if step.target is None:
                raise ValueError(self._no_target())
            if self.reads_teacher and not self.lm_head:
                kwargs["target"] = step.target
            else:
                args.append(step.target)
        try:
            return self.loss(*args, **kwargs)
        except ValueError as e:
            raise ValueError(f"term {self.name!r}: {e}") from e

    def _head_weights(self, vocab_map: VocabMap | None) -> tuple[Tensor, Tensor]:
        """The student's and the teacher's lm_head weights ``[V, H]``, on the shared rows of
        ``vocab_map`` when there is one."""
        if self.heads is None:
            raise RuntimeError(
                f"term {self.name!r} is a fused-linear term bound without its models; build it "
                "through kdkit.Distiller, which attaches the lm_head modules."
            )
        w_s, w_t = self.heads[0].weight, self.heads[1].weight
        if vocab_map is None:
            return w_s, w_t
        s, t = vocab_map(w_s.T, w_t.T)  # the map selects along the last (vocabulary) axis
        return s.T, t.T

    def _no_target(self) -> str:
        ignore_index = getattr(self.loss, "ignore_index", None)
        if self.term.target is None and ignore_index is not None:
            return (
                f"term {self.name!r}: {type(self.loss).__name__} has ignore_index="
                f"{ignore_index}, which drops the tokens whose label is {ignore_index}, but "
                "target is None; call distiller(inputs, target) (a dict batch: target=batch"
                "['labels']), or set ignore_index=None to average over every token."
            )
        return (
            f"term {self.name!r} reads labels but target is None; call distiller(inputs, target)."
        )

    def _features(self, step: StepInputs, adapters: Mapping[str, nn.Module]) -> tuple[Any, Any]:
        k = self.term.teacher_index
        available = step.teacher_features[k] if k < len(step.teacher_features) else {}
        s_vals, t_vals = [], []
        for sp, tp, adapter in self.layers:
            if tp not in available:
                raise ValueError(
                    f"term {self.name!r} reads teacher feature {tp!r}, which the teacher output "
                    f"does not contain (it has {sorted(available)}); run the teacher online or "
                    "cache that feature."
                )
            s = step.student_features[sp]
            s_vals.append(adapters[adapter](s) if adapter is not None else s)
            t_vals.append(available[tp])
        if isinstance(self.term.student, str):
            return s_vals[0], t_vals[0]
        return s_vals, t_vals


def name_terms(terms: Sequence[Term] | Mapping[str, Term]) -> dict[str, Term]:
    """Terms keyed by their log name: the mapping key, ``term.name`` or the loss's class name."""
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
    if not named:
        raise ValueError(
            "Distiller needs at least one term, got none; e.g. "
            "terms=[Term(KLDivLoss(temperature=4.0))]."
        )
    return named


def bind_terms(terms: dict[str, Term]) -> list[BoundTerm]:
    """Check every term and read its loss's contract once; refuse a set whose weights are all 0."""
    bound = [_bind(name, term) for name, term in terms.items()]
    if all(term.weight == 0 for term in terms.values()):
        raise ValueError(
            f"every term has weight 0 ({list(terms)}), so training would run with zero loss; "
            "give at least one term a weight > 0."
        )
    return bound


def _check_term(name: str, term: Term) -> None:
    """The checks that need no model: the loss, weight, adapter kind, what the two sides read."""
    if not callable(term.loss):
        raise TypeError(
            f"term {name!r} has loss {term.loss!r} ({type(term.loss).__name__}), which is not "
            "callable; pass a loss object, e.g. Term(kdkit.losses.KLDivLoss(temperature=4.0)) "
            "(a YAML config names it as _target_: kdkit.losses.KLDivLoss)."
        )
    w = term.weight
    if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
        raise ValueError(
            f"term {name!r} has weight {w!r}; weights must be finite numbers >= 0. "
            "To turn a term off use weight=0."
        )
    if term.adapter is not None and term.adapter not in ADAPTER_KINDS:
        allowed = ", ".join(map(repr, (None, *ADAPTER_KINDS)))
        raise ValueError(f"term {name!r} has adapter {term.adapter!r}; allowed: {allowed}.")
    if (term.student == LOGITS) != (term.teacher in (LOGITS, None)):
        raise ValueError(
            f"term {name!r} compares student {term.student!r} with teacher {term.teacher!r}; a "
            "term reads logits on both sides or features on both sides."
        )
    sp, tp = term.student_paths, term.teacher_paths
    if sp and len(sp) != len(tp):
        raise ValueError(
            f"term {name!r} pairs {len(sp)} student layers {sp} with {len(tp)} teacher layers "
            f"{tp}; give the same number on both sides (kdkit.capture.map_layers builds such "
            "pairs)."
        )


def check_vocab_map(vocab_map: VocabMap | None, bound: Sequence[BoundTerm]) -> VocabMap | None:
    """``vocab_map``, checked: a VocabMap, and no teacher term reads labels through a map of two
    tokenizers (the labels index the student's vocabulary)."""
    if vocab_map is None:
        return None
    if not isinstance(vocab_map, VocabMap):
        raise TypeError(
            f"vocab_map must be a kdkit.vocab.VocabMap, got {type(vocab_map).__name__}; build one "
            "with VocabMap.padded(len(tokenizer)) or VocabMap.from_tokenizers(student, teacher)."
        )
    if not vocab_map.is_prefix:
        for b in bound:
            if b.on_logits and b.reads_teacher and getattr(b.loss, "needs_target", False):
                raise ValueError(
                    f"term {b.name!r} ({type(b.loss).__name__}) reads class labels beside the "
                    "teacher, but labels index the student's vocabulary, not the tokens the two "
                    "tokenizers share (vocab_map); use a soft loss (e.g. KLDivLoss) for the "
                    "teacher and a separate CrossEntropyLoss term for the labels."
                )
    return vocab_map


def feature_paths(bound: Sequence[BoundTerm]) -> tuple[list[str], dict[int, list[str]]]:
    """The student module paths the terms read, and the teacher paths per teacher index (each
    once, in term order)."""
    student = list(dict.fromkeys(sp for b in bound for sp, _, _ in b.layers))
    teacher: dict[int, list[str]] = {}
    for b in bound:
        paths = teacher.setdefault(b.term.teacher_index, [])
        paths += [tp for _, tp, _ in b.layers if tp not in paths]
    return student, teacher


def check_paths(bound: Sequence[BoundTerm], student: nn.Module, teachers: list[nn.Module]) -> None:
    """Every module a term's addresses read exists (the error lists close names), and every feature
    term's ``teacher_index`` names a teacher."""
    n = max(len(teachers), 1)
    for b in bound:
        k = b.term.teacher_index
        if b.layers and not 0 <= k < n:
            raise ValueError(
                f"term {b.name!r} reads teacher_index={k} but there are {n} teacher(s); use an "
                f"index in 0..{n - 1}."
            )
        for sp, tp, _ in b.layers:
            _resolve(student, sp)
            if teachers:
                _resolve(teachers[k], tp)


def _resolve(model: nn.Module, address: str) -> None:
    module = parse_address(address).module
    if module is not None:
        resolve_module(model, module)


def build_adapters(
    bound: Sequence[BoundTerm], student: nn.Module, teachers: list[nn.Module], example_input: Any
) -> nn.ModuleDict:
    """The learned adapters the terms ask for, keyed by :func:`adapter_key`, sized by probing
    both models once with ``example_input`` and put on the student's device and dtype."""
    adapters = nn.ModuleDict()
    wanted = [b for b in bound if any(key for _, _, key in b.layers)]
    if not wanted:
        return adapters
    if example_input is None:
        raise ValueError(
            f"terms {sorted(b.name for b in wanted)} ask for learned adapters, whose sizes are "
            "probed with one dry-run forward; pass example_input=<one input batch> to Distiller."
        )
    if not teachers:
        raise ValueError(
            "adapters are sized by probing the teacher, but this Distiller has no teacher "
            "module; build the Distiller with the teacher (or use adapter=None)."
        )
    for b in wanted:
        term = b.term
        s_shapes = _probe(student, term.student_paths, example_input, "student")
        t_shapes = _probe(
            teachers[term.teacher_index], term.teacher_paths, example_input, "teacher"
        )
        for sp, tp, key in b.layers:
            adapters[key] = build_adapter(
                term.adapter,
                s_shapes.get(sp),
                t_shapes.get(tp),
                student_name=f"student.{sp}",
                teacher_name=f"teacher.{tp}",
            )
    like = next(student.parameters(), None)
    return adapters if like is None else adapters.to(like.device, like.dtype)


def _bind(name: str, term: Term) -> BoundTerm:
    _check_term(name, term)
    loss = term.loss
    if isinstance(loss, DistillationLoss):
        if term.mask and not loss.takes_mask:
            raise ValueError(
                f"term {name!r} asks for mask=True but {type(loss).__name__} declares "
                "takes_mask=False; drop mask=True or use a loss that takes a mask."
            )
        if term.teacher is None and loss.reads_teacher:
            raise ValueError(
                f"term {name!r} has teacher=None but {type(loss).__name__} reads the teacher "
                "(reads_teacher=True); drop teacher=None, or use a loss of the student alone "
                "(e.g. kdkit.losses.CrossEntropyLoss)."
            )
        if not loss.reads_teacher and term.teacher_paths:
            raise ValueError(
                f"term {name!r} reads teacher layers {term.teacher_paths} but "
                f"{type(loss).__name__} reads no teacher; set teacher=None."
            )
        _refuse_spatial_attention(name, term)
        gets_mask = loss.takes_mask if term.mask is None else term.mask
        contract: DistillationLoss | CallableLoss = loss
    else:
        contract = CallableLoss(loss, term)
        gets_mask = contract.takes_mask
    reads_teacher = term.teacher is not None and contract.reads_teacher
    adapted = term.adapter not in (None, "identity")  # "identity" needs no module
    lm_head = isinstance(loss, FusedLinearJSDLoss)
    pairs = (
        _head_inputs(name, term)
        if lm_head
        else zip(term.student_paths, term.teacher_paths, strict=True)
    )
    layers = tuple(
        (sp, tp, f"{name}__{i}" if adapted else None) for i, (sp, tp) in enumerate(pairs)
    )
    # A loss with ignore_index set gets the labels whenever it is not told otherwise: without
    # them it would average over the ignored (padding) tokens.
    ignores = isinstance(loss, DistillationLoss) and getattr(loss, "ignore_index", None) is not None
    return BoundTerm(
        name=name,
        term=term,
        loss=contract,
        reads_teacher=reads_teacher,
        reads_target=term.reads_target or (term.target is None and ignores),
        gets_mask=gets_mask,
        gets_num_items=contract.per_sample,
        on_logits=term.student == LOGITS and not lm_head,
        layers=layers,
        lm_head=lm_head,
    )


def _head_inputs(name: str, term: Term) -> list[tuple[str, str]]:
    """The ``(student, teacher)`` lm_head input addresses a fused-linear term reads."""
    student = LM_HEAD_INPUT if term.student == LOGITS else term.student
    teacher = LM_HEAD_INPUT if term.teacher == LOGITS else term.teacher
    for side, text in (("student", student), ("teacher", teacher)):
        address = parse_address(text) if isinstance(text, str) else None
        if address is None or not address.input or address.items:
            raise ValueError(
                f"term {name!r} ({type(term.loss).__name__}) reads {side}={text!r}; a fused-"
                "linear term reads the input of one lm_head module per side: 'logits' (the "
                f"module named lm_head) or 'module.path{INPUT_MARKER}'."
            )
    if term.adapter is not None:
        raise ValueError(
            f"term {name!r} ({type(term.loss).__name__}) has adapter={term.adapter!r}; a fused-"
            "linear term multiplies each model's hidden states by its own lm_head (the hidden "
            "sizes may differ), so it takes no adapter: drop it."
        )
    return [(student, teacher)]


def _probe(model: nn.Module, paths: list[str], example_input: Any, side: str) -> dict[str, Any]:
    """:func:`probe_shapes`, with a forward that fails on ``example_input`` named as such."""
    try:
        return probe_shapes(model, paths, example_input)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"the {side} failed on example_input (used once to size the adapters): {e}; pass "
            "one batch exactly as the Distiller will get it (a tensor, a tuple or a dict of "
            "the model's inputs)."
        ) from e


def _fits(mask: Tensor, student: Any) -> bool:
    """Whether a ``[B, L]`` token mask applies to the student tensor a term reads (the first of
    a list): its leading dims are ``[B, L]``, or it is an attention map ``[B, H, L, L]``.
    Sequence-level tensors (``[B, C]`` logits, ``[B, D]`` pooled states) get no mask. A token-level
    tensor of the mask's batch that the mask does not fit is refused: dropping the mask would
    silently count the padding."""
    x = student[0] if isinstance(student, list | tuple) and student else student
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) <= mask.dim():
        return False
    if tuple(shape[: mask.dim()]) == tuple(mask.shape):
        return True
    if len(shape) == 4 and mask.dim() == 2 and (shape[0], shape[-1]) == tuple(mask.shape):
        return True
    raise ValueError(
        f"the token mask has shape {tuple(mask.shape)}, which fits neither the student tensor "
        f"{tuple(shape)} ([B, L, ...] or an attention map [B, H, L, L]) nor a sequence-level "
        "one; pass the mask of this batch's tokens ([B, L], e.g. its attention_mask), or "
        "Term(..., mask=False) for a term that should not be masked."
    )


def _refuse_spatial_attention(name: str, term: Term) -> None:
    """The CNN attention-transfer loss would take a transformer's attention heads for channels."""
    if not isinstance(term.loss, AttentionLoss):
        return
    for text in [*term.student_paths, *term.teacher_paths]:
        address = parse_address(text)
        leaf = (address.module or "").rsplit(".", 1)[-1]
        if address.field == "attentions" or (
            address.items and ("attention" in leaf or "attn" in leaf or leaf == "self")
        ):
            raise ValueError(
                f"term {name!r} reads attention probabilities ({text!r}) with AttentionLoss, "
                "the spatial attention transfer of CNN feature maps: it would take the heads "
                "for channels and ignore the mask. Use a transformer attention loss: "
                "kdkit.losses.MiniLMAttentionLoss (attention distributions), "
                "TinyBERTAttentionLoss (scores from query/key), MiniLMValueRelationLoss or "
                "MiniLMv2RelationLoss."
            )


def _paths(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None or spec == LOGITS:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _default_name(loss: Callable[..., Tensor]) -> str:
    cls = type(loss).__name__ if isinstance(loss, nn.Module) else getattr(loss, "__name__", "term")
    cls = cls.removesuffix("Loss") or cls
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", cls).lower()
