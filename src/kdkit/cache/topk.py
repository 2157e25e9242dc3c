"""Top-k storage of teacher logits: compress to (log-probs, indices, tail mass) and back."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["topk_compress", "topk_log_compress", "topk_reconstruct"]


def _index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


def topk_log_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k log-probabilities, their class indices and the log of the tail mass (last dim).

    ``logp = log_softmax(z)``; ``values, index = topk(logp, k)``;
    ``log_tail = log sum_{c not in top-k} p_c``, the logsumexp of the rest (precise when the
    tail is tiny, unlike log(1 - sum of the top-k probs)); ``-inf`` when k = C.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, index = logp.topk(k, dim=-1)
    if k == logits.shape[-1]:
        return values, index, torch.full_like(logp[..., 0], float("-inf"))
    return values, index, logp.scatter(-1, index, float("-inf")).logsumexp(dim=-1)


def topk_compress(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k log-probabilities, their class indices and the tail mass, over the last dim.

    As :func:`topk_log_compress`, with ``tail = sum_{c not in top-k} p_c`` (exp of its
    ``log_tail``; 0 when k = C).
    """
    values, index, log_tail = topk_log_compress(logits, k)
    return values, index, log_tail.exp()


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
