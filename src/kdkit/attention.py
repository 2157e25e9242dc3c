"""Transformer attention quantities from captured query / key / value projections and a mask.

Hugging Face models do not always hand out their attention: with the default ``sdpa`` (or flash)
attention ``output.attentions`` is empty and the attention module returns ``None`` for its
weights; in eager mode the weights come after attention dropout; and nobody returns the
pre-softmax scores that TinyBERT distils. The projections are always there, as the outputs of
``nn.Linear`` modules (BERT: ``encoder.layer.{i}.attention.self.query`` / ``key`` / ``value``;
Llama: ``model.layers.{i}.self_attn.q_proj`` / ``k_proj`` / ``v_proj``), so kdkit computes what
the transformer losses compare from them, the same way for every attention implementation:

* :func:`attention_scores`: ``S_h = Q_h K_h^T / sqrt(d_h)`` per head, ``[B, H, L, L]``;
* :func:`attention_log_probs`: ``log softmax(S_h + M)`` over the keys, where ``M`` is 0 at kept
  keys and the dtype's minimum at padded ones: the model's own attention distribution;
* :func:`relation_log_probs`: ``log softmax(X_h X_h^T / sqrt(d_r) + M)``, the self-relation of
  one projection split into ``R`` relation heads (MiniLM's value relation with ``R = H``,
  MiniLMv2's query / key / value relations with any ``R`` dividing the width).

Projections are ``[B, L, H * d]`` (what the ``nn.Linear`` returns); ``mask`` is the
``[B, L]`` attention mask (True or 1 = real token). Rotary position embeddings (Llama) are applied
to queries and keys *after* the projection, so for such models the distribution from ``q_proj`` /
``k_proj`` outputs is not the model's; the relations (MiniLMv2) do not claim to be.
Computed in the inputs' dtype: upcast half-precision inputs first for a float32 result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kdkit._checks import check_mask

__all__ = [
    "RELATIONS",
    "attention_log_probs",
    "attention_probs",
    "attention_scores",
    "check_num_heads",
    "check_relations",
    "check_same_heads",
    "relation_log_probs",
    "split_heads",
]


def check_num_heads(name: str, value: int, who: str) -> int:
    """Return the head count ``value``, or raise: it must be a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{who}: {name} must be a positive int, got {value!r}; pass the model's head count "
            "(config.num_attention_heads)"
        )
    return value


def check_same_heads(student_heads: int, teacher_heads: int | None, who: str) -> tuple[int, int]:
    """``(student_heads, teacher_heads)`` (None = the student's), or raise unless they are equal:
    per-head attention maps (TinyBERT, MiniLM) are compared head by head."""
    teacher_heads = student_heads if teacher_heads is None else teacher_heads
    check_num_heads("student_heads", student_heads, who)
    check_num_heads("teacher_heads", teacher_heads, who)
    if student_heads != teacher_heads:
        raise ValueError(
            f"{who} compares the attention maps head by head, so student and teacher need the "
            f"same number of heads, got student_heads={student_heads} and teacher_heads="
            f"{teacher_heads}; use MiniLMv2RelationLoss (relation heads independent of the "
            "models' head counts), or a student with the teacher's head count"
        )
    return student_heads, teacher_heads


def split_heads(x: Tensor, num_heads: int, name: str = "projection") -> Tensor:
    """``[B, L, H * d] -> [B, H, L, d]``: a projection's output split into ``num_heads`` heads."""
    check_num_heads("num_heads", num_heads, "split_heads")
    if x.dim() != 3:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; a query/key/value projection is [B, L, H * d] "
            "(the output of the attention's nn.Linear, e.g. encoder.layer.0.attention.self.query)"
        )
    batch, length, width = x.shape
    if width % num_heads:
        raise ValueError(
            f"{name} has width {width} (shape {tuple(x.shape)}), which {num_heads} heads do not "
            f"divide; pass the model's head count (config.num_attention_heads), or a number of "
            f"relation heads that divides {width}"
        )
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def attention_scores(query: Tensor, key: Tensor, num_heads: int) -> Tensor:
    """Pre-softmax attention scores ``Q_h K_h^T / sqrt(d_h)`` per head: ``[B, H, L_q, L_k]``.

    ``query`` and ``key`` are projections ``[B, L, H * d_h]`` of one model. No mask is applied:
    these are the scores TinyBERT compares (padded positions are left to the loss to drop).
    """
    q = split_heads(query, num_heads, "query")
    k = split_heads(key, num_heads, "key")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query shape {tuple(query.shape)} and key shape {tuple(key.shape)} do not fit: "
            "pass the query and the key projection of the same layer, in that order"
        )
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def _masked_log_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        keep = check_mask(mask, (scores.shape[0], scores.shape[-1]), scores.device)
        # The additive mask of Hugging Face's eager attention: the dtype's minimum, not -inf, so a
        # row whose keys are all padding stays finite (uniform) instead of NaN.
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def attention_log_probs(
    query: Tensor, key: Tensor, num_heads: int, mask: Tensor | None = None
) -> Tensor:
    """``log softmax(Q_h K_h^T / sqrt(d_h) + M)`` over the keys: ``[B, H, L, L]``.

    ``M`` is 0 at the keys ``mask`` keeps and the dtype's minimum at padded ones, as in the
    models' eager attention; padded *queries* keep a distribution over the real keys, as there.
    """
    return _masked_log_softmax(attention_scores(query, key, num_heads), mask)


def attention_probs(
    query: Tensor, key: Tensor, num_heads: int, mask: Tensor | None = None
) -> Tensor:
    """The attention distribution ``softmax(Q_h K_h^T / sqrt(d_h) + M)``: ``[B, H, L, L]``.

    Equals the model's ``output.attentions`` (eager attention, no dropout) computed from the
    captured projections, with any attention implementation.
    """
    return attention_log_probs(query, key, num_heads, mask).exp()


def relation_log_probs(x: Tensor, num_heads: int, mask: Tensor | None = None) -> Tensor:
    """Self-relation ``log softmax(X_h X_h^T / sqrt(d_r) + M)`` of one projection: ``[B, R, L, L]``.

    ``x`` ``[B, L, R * d_r]`` is split into ``num_heads`` (``R``) relation heads: MiniLM's value
    relation (Wang et al. 2020) with ``x = V`` and ``R`` the model's head count; MiniLMv2's
    (Wang et al. 2021) query-query / key-key / value-value relations with any ``R`` dividing the
    width, so that models of different sizes and head counts give relations of one shape.
    """
    return _masked_log_softmax(attention_scores(x, x, num_heads), mask)


RELATIONS = ("query", "key", "value")


def check_relations(relations: Sequence[str]) -> tuple[str, ...]:
    """Return MiniLMv2's ``relations`` as a tuple, or raise: distinct names among
    :data:`RELATIONS` (the projections whose self-relations are compared)."""
    names = (relations,) if isinstance(relations, str) else tuple(relations)
    if not names or len(set(names)) != len(names) or not set(names) <= set(RELATIONS):
        raise ValueError(
            f"relations must be distinct names among {RELATIONS}, got {relations!r}; the loss "
            "then reads one projection per name for each layer, in that order"
        )
    return names
