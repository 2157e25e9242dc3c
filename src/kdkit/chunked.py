"""Token losses a chunk of rows at a time, so that no ``[N, V]`` intermediate is kept.

A token loss on logits ``[N, V]`` (``N`` tokens, vocabulary ``V``) built from torch ops keeps
several ``[N, V]`` tensors for its backward (log-probabilities of both models, the mixture of a
JSD, ...): the naive ``F.kl_div(log_softmax(s), softmax(t))`` peaks at about 5x one logits
tensor. Here the per-row function of :mod:`kdkit.functional` runs on ``chunk_size`` rows at a
time, and its gradient is taken right there, while the chunk's intermediates are alive anyway:

* :func:`chunked_rows` (logit losses): the per-row values ``[N]`` are returned; the gradient
  w.r.t. the student logits is written into one buffer shaped like them, which becomes that
  gradient in the backward (scaled in place by the upstream per-row gradient, so every reduction
  and ``num_items_in_batch`` work). Extra memory: that buffer (which is the logits' gradient)
  plus one chunk's intermediates.
* :func:`fused_linear_rows` (hidden states and the lm_head weight): the logits themselves exist
  one chunk at a time; the gradients w.r.t. the hidden states and the weight are accumulated in
  the chunk loop (as Liger-Kernel's fused linear losses do), so nothing is recomputed.

The same function computes the values as without chunks, so chunked and unchunked losses agree
to rounding: values exactly, gradients to the last bit or so (the upstream scale is applied after
the per-row gradient instead of before).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from kdkit.functional import cross_entropy, unshared_log_softmax

CHUNK_ELEMENTS = 2**21
"""Logit entries per chunk with ``chunk_size="auto"``: 8 MiB per float32 intermediate, so one
chunk's ~10-20 intermediates stay well under one ``[N, V]`` tensor at LLM sizes, while each kernel
still sees millions of elements (``V = 32000``: 65 rows; a 96-character vocabulary: 21845)."""

FUSED_CHUNK_ELEMENTS = 2**22
"""Logit entries per chunk of the fused-linear loss with ``chunk_size="auto"`` (16 MiB per float32
intermediate; ``V = 32000``: 131 rows). Larger than :data:`CHUNK_ELEMENTS` because each chunk
also adds its ``[V, H]`` weight-gradient product: with few rows that product is a thin matrix
multiply that threads poorly (65-row chunks took ~1.8x the naive loop's time on 2 threads, 131-row
ones 1.3-1.4x under load and 0.95x on a quiet machine), while the extra peak stays ~1.2-1.4
``[N, V]`` tensors (the naive loop: 7)."""

ChunkSize = int | Literal["auto"]

RowFunction = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""``(student_logits [n, V], teacher_logits [n, V], keep [n] or None) -> per-row values [n]``,
0 (and with no gradient) at the rows ``keep`` drops."""


def check_chunk_size(chunk_size: ChunkSize | None, who: str) -> ChunkSize | None:
    """Return ``chunk_size`` (rows per chunk, ``"auto"``, or None = no chunks) or raise."""
    if chunk_size is None or chunk_size == "auto":
        return chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"{who}: chunk_size must be a positive number of token rows, 'auto' (about "
            f"{CHUNK_ELEMENTS} logits per chunk) or None (no chunking), got {chunk_size!r}; "
            "smaller chunks use less memory, larger ones fewer kernel calls"
        )
    return chunk_size


def rows_per_chunk(chunk_size: ChunkSize, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk: ``chunk_size``, or for ``"auto"`` the rows of ``elements`` logits."""
    return max(1, elements // max(vocab, 1)) if chunk_size == "auto" else chunk_size


def _chunks(rows: int, chunk_size: int) -> list[slice]:
    return [slice(start, start + chunk_size) for start in range(0, rows, chunk_size)]


def _values_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype of the per-row values of these inputs: their common dtype, at least float32
    (kdkit upcasts half-precision logits)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def _part(keep: Tensor | None, rows: slice) -> Tensor | None:
    return None if keep is None else keep[rows]


def _value_and_grad(function: RowFunction, student: Tensor, teacher: Tensor, keep: Tensor | None):
    """The rows of one chunk and the gradient of their sum w.r.t. ``student``."""
    leaf = student.detach().requires_grad_(True)
    with torch.enable_grad():
        values = function(leaf, teacher, keep)
        (grad,) = torch.autograd.grad(values.sum(), leaf)
    return values.detach(), grad


class _ChunkedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, keep, function, chunk_size):  # type: ignore[override]
        grad = torch.empty_like(student)
        dtype = _values_dtype(student, teacher)
        values = torch.empty(student.shape[0], dtype=dtype, device=student.device)
        for rows in _chunks(student.shape[0], chunk_size):
            values[rows], grad[rows] = _value_and_grad(
                function, student[rows], teacher[rows], _part(keep, rows)
            )
        ctx.grad = grad
        return values

    @staticmethod
    def backward(ctx, grad_rows):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "backward ran twice through a chunked token loss (retain_graph=True); it keeps "
                "one gradient buffer and scales it in place. Build the loss with chunk_size=None "
                "to backpropagate through it more than once"
            )
        return grad.mul_(grad_rows.unsqueeze(-1).to(grad.dtype)), None, None, None, None


def chunked_rows(
    function: RowFunction,
    student: Tensor,
    teacher: Tensor,
    keep: Tensor | None,
    chunk_size: ChunkSize,
) -> Tensor:
    """The per-row values of ``function`` on logits ``[..., V]``, computed ``chunk_size`` rows
    at a time (see :func:`rows_per_chunk`); shape ``student.shape[:-1]``.

    ``keep`` is a checked bool mask shaped ``student.shape[:-1]`` (or None). The gradient flows to
    ``student`` only: the teacher is the (frozen) target, and a ``teacher`` that requires grad
    must not come here.
    """
    vocab = student.shape[-1]
    chunk_size = rows_per_chunk(chunk_size, vocab)
    flat_student, flat_teacher = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    flat_keep = None if keep is None else keep.reshape(-1)
    with unshared_log_softmax():
        if torch.is_grad_enabled() and student.requires_grad:
            rows = _ChunkedRows.apply(flat_student, flat_teacher, flat_keep, function, chunk_size)
        else:
            rows = torch.cat(
                [
                    function(flat_student[part], flat_teacher[part], _part(flat_keep, part))
                    for part in _chunks(flat_student.shape[0], chunk_size)
                ]
            )
    return rows.reshape(student.shape[:-1])


class _FusedLinearRows(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_input,
        student_weight,
        teacher_input,
        teacher_weight,
        keep,
        function,
        chunk_size,
        denominator,
        labels,
        label_weight,
    ):
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_input = torch.zeros_like(student_input) if need_input else None
        # Accumulated over the chunks in at least float32, so half-precision weights lose nothing
        # to it, and in float64 when any input is.
        acc = _values_dtype(student_input, student_weight, teacher_input, teacher_weight)
        grad_weight = torch.zeros_like(student_weight, dtype=acc) if need_weight else None
        total = torch.zeros((), dtype=acc, device=student_input.device)
        for rows in _chunks(student_input.shape[0], chunk_size):
            hidden, part = student_input[rows], _part(keep, rows)
            student_logits = hidden @ student_weight.T
            teacher_logits = teacher_input[rows] @ teacher_weight.T
            chunk_function = (
                function
                if labels is None
                else _with_cross_entropy(function, labels[rows], label_weight)
            )
            if not (need_input or need_weight):
                total += chunk_function(student_logits, teacher_logits, part).sum()
                continue
            value, grad = _value_and_grad(chunk_function, student_logits, teacher_logits, part)
            total += value.sum()
            if grad_input is not None:
                grad_input[rows] = grad @ student_weight
            if grad_weight is not None:
                if part is not None:  # NaN hidden states at dropped rows: 0 * NaN is NaN
                    hidden = hidden.masked_fill(~part.unsqueeze(-1), 0.0)
                grad_weight.addmm_(grad.T.to(acc), hidden.to(acc))
        if grad_input is not None:
            grad_input.div_(denominator)
        if grad_weight is not None:
            grad_weight = grad_weight.div_(denominator).to(student_weight.dtype)
        ctx.save_for_backward(grad_input, grad_weight)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_input, grad_weight = ctx.saved_tensors
        return (
            None if grad_input is None else grad_input * grad_output.to(grad_input.dtype),
            None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype),
            *([None] * 8),
        )


def _with_cross_entropy(function: RowFunction, labels: Tensor, weight: float) -> RowFunction:
    """``function`` plus ``weight`` times the student's cross-entropy on ``labels`` per row (0 at
    the rows ``keep`` drops): one chunk's rows of a fused loss that also trains on the labels."""

    def rows(student: Tensor, teacher: Tensor, keep: Tensor | None) -> Tensor:
        hard = cross_entropy(student, labels, mask=keep, reduction="none", validate_args=False)
        return function(student, teacher, keep) + weight * hard

    return rows


def fused_linear_rows(
    function: RowFunction,
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    keep: Tensor | None,
    chunk_size: ChunkSize,
    denominator: float | Tensor,
    labels: Tensor | None = None,
    label_weight: float = 0.0,
) -> Tensor:
    """``sum_n function(x_s W_s^T, x_t W_t^T)_n / denominator`` over hidden states ``[N, H]``,
    with the logits computed ``chunk_size`` rows at a time and never kept; with ``labels``
    (``[N]``, class ids at the kept rows) each row also adds ``label_weight`` times the student's
    cross-entropy on its label.

    The gradients w.r.t. ``student_input`` and ``student_weight`` are computed in the chunk loop;
    the teacher side gets none (it is the frozen target). ``keep`` is a checked bool ``[N]``.
    """
    with unshared_log_softmax():
        return _FusedLinearRows.apply(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            keep,
            function,
            rows_per_chunk(chunk_size, student_weight.shape[0], FUSED_CHUNK_ELEMENTS),
            denominator,
            labels,
            label_weight,
        )
