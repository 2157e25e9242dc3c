"""Argument and tensor checks shared by :mod:`kdkit.functional` and :mod:`kdkit.losses`.

Hyper-parameter checks (temperature, weights, beta, p) return the cleaned value; a module runs
them once in ``__init__`` and calls the functional API with ``validate_args=False``. Tensor
checks (shapes, masks, labels) look at each call's inputs and always run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_temperature(value: float) -> float:
    """Return ``value`` as a float, or raise the standard error for a bad temperature."""
    if not _is_number(value):
        raise TypeError(
            f"temperature must be a positive number, got {value!r} of type "
            f"{type(value).__name__}; pass a float such as temperature=4.0"
        )
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"temperature must be > 0, got {value}; the softmax is taken of logits / temperature, "
            "so use a finite positive value (1.0 = plain softmax, 2.0-8.0 is typical for KD)"
        )
    return value


def check_weight(name: str, value: float) -> float:
    """Return the loss-term weight ``value`` as a float, or raise: it must be finite and >= 0."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number >= 0, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value}; it weights a loss term, "
            f"so a negative weight would reward the student for moving away from the target"
        )
    return value


def check_jsd_beta(beta: float) -> float:
    """Return the generalized JSD's ``beta`` as a float, or raise: it must lie in [0, 1]."""
    if not _is_number(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"beta must be a number in [0, 1], got {beta!r}; 0 = forward KL(teacher || student), "
            "1 = reverse KL(student || teacher), in between = generalized JSD"
        )
    return float(beta)


def check_attention_p(p: float) -> float:
    """Return the attention map's exponent ``p``, or raise: it must be a number > 0."""
    if not _is_number(p) or not math.isfinite(p) or p <= 0:
        raise ValueError(
            f"p must be a number > 0, got {p!r}; the attention map is mean_c |F_c|^p, and the "
            "paper uses p=2"
        )
    return p


def check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Student and teacher logits: ``[B, C]`` or ``[B, L, C]``, the same shape."""
    if student_logits.shape == teacher_logits.shape and 2 <= student_logits.dim() <= 3:
        return  # the common case, decided in two comparisons (a step's hot path)
    s, t = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if student_logits.dim() not in (2, 3):
        raise ValueError(
            f"student logits must be [B, C] or token logits [B, L, C], got shape {s}; "
            "flatten extra dimensions or select the logits tensor from the model output"
        )
    if s[-1] != t[-1]:
        raise ValueError(
            f"student logits have {s[-1]} classes (shape {s}) but teacher logits have "
            f"{t[-1]} (shape {t}); logit distillation needs one shared label space - "
            "use the same classifier head size, or distill features with an adapter instead"
        )
    if s != t:
        raise ValueError(
            f"student logits shape {s} != teacher logits shape {t}; both models must see the "
            "same batch (and, for token logits, the same sequence length / padding)"
        )


def check_mask(
    mask: Tensor, token_shape: torch.Size | tuple[int, ...], device: torch.device
) -> Tensor:
    """Return ``mask`` as a bool tensor on ``device`` (True = keep), or raise for a bad one."""
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the logits' token shape "
            f"{tuple(token_shape)}; pass a bool mask shaped like the logits without the class "
            "dimension (True = keep the token)"
        )
    mask = mask.to(device)
    if mask.dtype == torch.bool:
        return mask
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            f"mask holds values other than 0/1 (dtype {mask.dtype}); pass a bool mask (True = "
            "keep the token). Labels go in target=, with ignore_index set."
        )
    return mask != 0


def check_hard_target(target: Tensor, logits: Tensor) -> None:
    """Class indices shaped like ``logits`` without the class dim."""
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}; expected class indices shaped {tuple(logits.shape[:-1])}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices, got dtype {target.dtype}; "
            "convert with target.long()"
        )


def check_num_items(count: int | Tensor) -> int | Tensor:
    """Return ``num_items_in_batch`` or raise: a whole number >= 1 (a count of kept tokens or
    samples), or a one-element tensor (its value is not read: that would stall an accelerator)."""
    if isinstance(count, Tensor):
        if count.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element tensor, got a tensor of "
                f"shape {tuple(count.shape)}; pass the count of kept tokens of the whole batch."
            )
        return count
    if not _is_number(count) or not math.isfinite(count) or count != int(count) or count < 1:
        raise ValueError(
            f"num_items_in_batch must be a whole number >= 1, got {count!r}: it is the count of "
            "kept tokens (or samples) of the whole batch, across gradient-accumulation steps, "
            "that the mean divides by; leave it None to divide by this call's kept count."
        )
    return count


def check_skew_alpha(alpha: float) -> float:
    """Return the skew KL's ``alpha`` as a float, or raise: it must lie in [0, 1)."""
    if not _is_number(alpha) or not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"alpha must be a number in [0, 1), got {alpha!r}; it is the share of the target "
            "distribution mixed into the other side (DistiLLM uses 0.1; 0 = plain KL, and at 1 "
            "the divergence is 0 for every student)"
        )
    return float(alpha)
