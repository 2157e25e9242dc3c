"""How a Distiller's parts are built from its arguments, once, at construction.

:func:`assemble` binds the terms to their loss contracts, finds the feature paths they read,
builds the teacher side, the student's feature capture and the adapters, and checks what can be
checked before a step runs (paths exist, the vocab map fits, a token cache meets sparse terms).
:class:`kdkit.Distiller` keeps the parts and runs the step.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.capture import Selector, StepCapture
from kdkit.fused import attach_heads, elided_paths
from kdkit.teachers import Teachers, check_sparse_terms, source_of
from kdkit.term import (
    BoundTerm,
    Term,
    bind_terms,
    build_adapters,
    check_paths,
    check_vocab_map,
    feature_paths,
    name_terms,
)
from kdkit.vocab import VocabMap


@dataclass
class DistillerParts:
    """What a Distiller's step reads, built by :func:`assemble`."""

    terms: dict[str, Term]
    bound: list[BoundTerm]
    teacher_side: Teachers
    losses: nn.ModuleDict
    adapters: nn.ModuleDict
    student_capture: StepCapture
    student_feature_paths: list[str]
    vocab_map: VocabMap | None
    reads_teacher: bool
    gets_mask: bool


def assemble(
    student: nn.Module,
    teacher: Any,
    terms: Sequence[Term] | Mapping[str, Term],
    *,
    teacher_weights: Sequence[float] | None,
    teacher_logits_selector: Selector,
    example_input: Any,
    autocast_dtype: torch.dtype | None,
    channels_last: bool,
    compile: bool,
    vocab_map: VocabMap | None,
) -> DistillerParts:
    """The parts for ``Distiller(student, teacher, terms, ...)`` (arguments as documented there)."""
    named = name_terms(terms)
    bound = bind_terms(named)
    student_paths, teacher_paths = feature_paths(bound)
    student_elided, teacher_elided = elided_paths(bound)
    if compile and (student_paths or any(teacher_paths.values())):
        raise ValueError(
            "compile=True supports logit terms only; feature terms add hooks on every "
            "step, which would force recompiles. Drop compile or the feature terms."
        )
    source = source_of(
        teacher,
        teacher_paths,
        logits_selector=teacher_logits_selector,
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
        compile=compile,
        elide=teacher_elided,
    )
    check_sparse_terms(bound, source)
    teacher_side = Teachers(
        source, weights=teacher_weights, logits_selector=teacher_logits_selector
    )
    teachers = list(teacher_side.modules)
    check_paths(bound, student, teachers)
    bound = attach_heads(bound, student, teachers)
    return DistillerParts(
        terms=named,
        bound=bound,
        teacher_side=teacher_side,
        losses=nn.ModuleDict(
            {n: t.loss for n, t in named.items() if isinstance(t.loss, nn.Module)}
        ),
        student_capture=StepCapture(student, student_paths, elide=student_elided),
        adapters=build_adapters(bound, student, teachers, example_input),
        student_feature_paths=student_paths,
        vocab_map=check_vocab_map(vocab_map, bound),
        reads_teacher=any(b.reads_teacher for b in bound),
        gets_mask=any(b.gets_mask for b in bound),
    )


def selectors(
    logits_selector: Selector,
    teacher_logits_selector: Selector,
    logits: Selector = None,
    teacher_logits: Selector = None,
) -> tuple[Selector, Selector]:
    """The student's and the teachers' logits selectors (the teachers' defaults to the
    student's), also given under their deprecated names ``logits=`` / ``teacher_logits=``."""
    student = _renamed("logits", logits, "logits_selector", logits_selector)
    teacher = _renamed(
        "teacher_logits", teacher_logits, "teacher_logits_selector", teacher_logits_selector
    )
    return student, student if teacher is None else teacher


def _renamed(old: str, old_value: Selector, new: str, new_value: Selector) -> Selector:
    """``new_value``, or the value given under the deprecated keyword ``old``, with a warning."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"Distiller() got both {old}= and {new}=; pass {new}= only.")
    warnings.warn(
        f"Distiller({old}=...): {old}= is deprecated; use {new}=.", DeprecationWarning, stacklevel=4
    )
    return old_value
