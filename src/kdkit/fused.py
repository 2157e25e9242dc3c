"""Fused-linear terms in the Distiller: language-model distillation without ``[B, L, V]`` logits.

A term whose loss is :class:`kdkit.losses.FusedLinearJSDLoss` reads, of the student and of the
teacher, the input of the lm_head (the last hidden states ``[B, L, H]``, address
``"lm_head:input"``) and the lm_head's weight ``[V, H]``; the loss computes the logits a chunk
of tokens at a time and never holds them whole. So that the models do not compute them either,
the Distiller calls both with their lm_head running on zero tokens: a forward pre-hook records
the head's input and hands the head that input cut to length 0 on the token axis
(:class:`kdkit.capture.StepCapture`'s ``elide``). The models' outputs then hold logits of shape
``[B, 0, V]``.

Why not ``logits_to_keep``: in transformers 5 an int keeps the last n positions and ``0`` keeps
*all* of them; only an empty index tensor keeps none, and then the lm_head's input is the sliced
(empty) one too, so the hidden states would have to come from ``output.hidden_states[-1]``,
which needs ``output_hidden_states=True``: every layer's states returned (for a deep teacher
under ``no_grad`` more memory than its logits), and not the head's input in every architecture.
The hook needs no model argument, works for any model that calls its head module (Hugging Face
or not, any transformers version), and reads exactly what the head multiplies.

Labels: the term's ``target`` is aligned with the hidden states, ``labels[:, t]`` the token
after position ``t`` (-100: no loss there), shifted once by the data, as :mod:`kdkit.data.text`
and :mod:`kdkit.generation` make them; no loss shifts again. Usage::

    distiller = Distiller(student, teacher, [Term(FusedLinearJSDLoss(beta=0.5, ignore_index=-100))])
    out = distiller(input_ids, labels)   # out.student_output.logits has shape [B, 0, V]

What this needs of the models, checked when the Distiller is built: an online teacher module
(a cache holds no hidden states and weights), a head with a 2-D ``weight`` and no bias, and no
transform of the logits after the head (Gemma's ``final_logit_softcapping``, a ``logit_scale``):
the fused loss would not see it. No other term may read the teacher's logits, which are not
computed. A term of the student alone on its logits (cross-entropy on the labels beside the fused
distillation term, as LLM recipes do) keeps the student's head running: the student's logits then
exist as they must for that term, the teacher's still never do. ``FusedLinearJSDLoss(ce_weight=)``
computes that cross-entropy inside the fused term instead, and then neither head runs. When the
student's head is elided too and the batch is a dict, the student is not given the
``teacher_drop_keys`` (the labels) either: a Hugging Face model would compute its own loss on
logits it no longer has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor, nn

from kdkit.capture import parse_address, resolve_module
from kdkit.term import BoundTerm

__all__ = ["attach_heads", "elided_paths"]

_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")


def attach_heads(
    bound: Sequence[BoundTerm], student: nn.Module, teachers: Sequence[nn.Module]
) -> list[BoundTerm]:
    """``bound`` with every fused-linear term given its student and teacher lm_head modules;
    refuse what the fused terms cannot work with (see the module docstring)."""
    fused = [b for b in bound if b.lm_head]
    if not fused:
        return list(bound)
    names = [b.name for b in fused]
    for b in bound:
        if b.on_logits and b.reads_teacher:
            raise ValueError(
                f"term {b.name!r} reads the teacher's logits, but the fused-linear term(s) "
                f"{names} make the teacher skip its lm_head, so its logits are not computed; "
                "distil with the fused term alone (plus terms of the student alone, e.g. "
                "cross-entropy), or use logit losses (KLDivLoss, GeneralizedJSDLoss, ...) on the "
                "full logits instead of FusedLinearJSDLoss."
            )
    if not teachers:
        raise ValueError(
            f"the fused-linear term(s) {names} read the teacher's last hidden states and lm_head "
            "weight, which need the teacher module itself; pass it as Distiller(student, teacher, "
            "...) (a cache or a precomputed teacher_output holds neither)."
        )
    heads = {}
    for b in fused:
        ((s_address, t_address, _),) = b.layers
        heads[b.name] = (
            _head(student, s_address, "student", b.name),
            _head(teachers[b.term.teacher_index], t_address, "teacher", b.name),
        )
    return [dataclasses.replace(b, heads=heads[b.name]) if b.lm_head else b for b in bound]


def elided_paths(bound: Sequence[BoundTerm]) -> tuple[list[str], dict[int, list[str]]]:
    """The ``"head:input"`` addresses whose modules run on zero tokens: the student's (none when
    a term reads the student's logits), and the teachers' by teacher index."""
    student: list[str] = []
    teacher: dict[int, list[str]] = {}
    for b in bound:
        if b.lm_head:
            ((s_address, t_address, _),) = b.layers
            student.append(s_address)
            teacher.setdefault(b.term.teacher_index, []).append(t_address)
    if any(b.on_logits for b in bound):
        student = []
    return student, teacher


def _head(model: nn.Module, address: str, side: str, name: str) -> nn.Module:
    path = parse_address(address).module or ""
    head = resolve_module(model, path)
    weight = getattr(head, "weight", None)
    who = f"term {name!r} reads the {side}'s {address!r}"
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{who}, but {type(head).__name__} at {path!r} has no 2-D weight [V, H] to multiply "
            "the hidden states by; name the model's output projection (an nn.Linear), e.g. "
            "student='lm_head:input'."
        )
    if getattr(head, "bias", None) is not None:
        raise ValueError(
            f"{who}, but that head has a bias, which FusedLinearJSDLoss does not add; use "
            "GeneralizedJSDLoss / KLDivLoss on the full logits for this model."
        )
    config = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value is not None and value != 1:
            raise ValueError(
                f"{who}, but {type(model).__name__} transforms its logits after the head "
                f"(config.{key}={value!r}), which the fused loss would not apply; use "
                "GeneralizedJSDLoss / KLDivLoss on the full logits for this model."
            )
    return head
