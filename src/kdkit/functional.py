"""Distillation losses as pure functions: tensors in, reduced loss out.

The math of every kdkit loss lives here once; :mod:`kdkit.losses` only wraps it in modules.

Conventions shared by the logit losses:

* ``student_logits`` and ``teacher_logits`` have the same shape, ``[B, C]`` or token logits
  ``[B, L, C]``, with classes on the last dimension.
* ``p_t = softmax(z_t / T)`` and ``p_s = softmax(z_s / T)``; the soft terms are multiplied by
  ``T**2`` (Hinton et al. 2015) so that their gradients keep their scale as ``T`` changes.
* Divergences are summed over classes and averaged over samples (``batchmean``), never over
  elements: an element mean would divide the loss by the class count. For token logits the
  average runs over the tokens kept by ``mask`` (bool ``[B, L]``, True = keep). Dropped tokens
  are zeroed before anything else, so NaN/Inf there (fp16 overflow in padding) cannot reach a
  gradient.
* Half-precision inputs are upcast to float32 before ``log_softmax``; the loss is float32.

Keywords shared by the per-sample losses (after ``torch.nn.functional``):

* ``reduction``: ``"mean"`` (default), ``"sum"``, or ``"none"``: the per-sample ``[B]`` /
  per-token ``[B, L]`` values, 0 at dropped positions.
* ``num_items_in_batch``: replaces the mean's denominator (the kept count of this call), e.g. by
  the kept-token count of a whole batch split into gradient-accumulation steps, so that the
  accumulated gradient equals the whole batch's.
* ``validate_args``: check the hyper-parameters (temperature, weights, ``beta``, ``p``,
  ``reduction``); :mod:`kdkit.losses` passes False because it checked them once in ``__init__``
  (torchmetrics' pattern). The tensors of each call are always checked.

DIST, PKT and RKD relate the samples of a batch to each other: they have no per-sample value and
return the batch's scalar only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit._checks import (
    check_attention_p,
    check_hard_target,
    check_jsd_beta,
    check_logits,
    check_mask,
    check_skew_alpha,
    check_temperature,
    check_weight,
)
from kdkit.attention import (
    RELATIONS,
    attention_log_probs,
    attention_scores,
    check_num_heads,
    check_relations,
    check_same_heads,
    relation_log_probs,
)
from kdkit.contract import check_reduction, plain_mean, reduce, reduce_sum

__all__ = [
    "attention_map",
    "attention_transfer",
    "check_temperature",
    "cosine_hidden_states",
    "cross_entropy",
    "dist",
    "dkd",
    "generalized_jsd",
    "hinton_loss",
    "kl_div",
    "minilm_attention",
    "minilm_value_relation",
    "minilmv2_relations",
    "mse_hidden_states",
    "mse_logits",
    "patient_kd",
    "pkt",
    "reverse_kl_div",
    "rkd",
    "skew_kl_div",
    "skew_reverse_kl_div",
    "soft_cross_entropy",
    "tinybert_attention",
    "sparse_kl_div",
    "topk_at_temperature",
    "tvd",
    "unshared_log_softmax",
]

Count = int | Tensor | None

_IGNORE_INDEX = -100  # F.nll_loss's ignore_index, given to the samples a hard-label term drops


# --------------------------------------------------------------------------------------------
# shared private helpers
# --------------------------------------------------------------------------------------------


def _upcast(x: Tensor) -> Tensor:
    # log_softmax in fp16/bf16 loses the small probabilities that carry the "dark knowledge".
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


_SHARED: ContextVar[dict[tuple[int, int, float, bool], tuple[Tensor, Tensor]] | None] = ContextVar(
    "kdkit_shared_log_softmax", default=None
)


class shared_log_softmax:  # noqa: N801 (a context manager, named as the function it was)
    """Within this block, ``log_softmax(z, T)`` of the same tensor and T is computed once.

    The Distiller opens it around its terms, so KD, Hinton and CE terms on the same logits share
    one softmax per temperature. Entries are keyed by the tensor's identity and version counter
    (an in-place change invalidates them) and hold the tensor, so its id cannot be reused.
    (A class, not a ``@contextmanager`` generator: measured ~10 us cheaper per step.)
    """

    def __enter__(self) -> None:
        self._token = _SHARED.set({})

    def __exit__(self, *exc: object) -> None:
        _SHARED.reset(self._token)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """``z / T`` (float32 for half-precision ``z``; no division at T = 1)."""
    return _upcast(logits) if temperature == 1.0 else _upcast(logits) / temperature


def log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(z / T)`` over the last dim, in float32 for half-precision logits."""
    memo = _SHARED.get()
    key = (id(logits), logits._version, float(temperature), torch.is_grad_enabled())
    if memo is not None and key in memo and memo[key][0] is logits:
        return memo[key][1]
    out = F.log_softmax(_scaled(logits, temperature), dim=-1)
    if memo is not None:
        memo[key] = (logits, out)
    return out


def _keep(mask: Tensor | None, values: Tensor) -> Tensor | None:
    """The checked bool mask over ``values`` without its last dim (None when no mask)."""
    return None if mask is None else check_mask(mask, values.shape[:-1], values.device)


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def _drop(x: Tensor, keep: Tensor | None) -> Tensor:
    """Zero the rows of ``x`` that ``keep`` drops: NaN/Inf there has no gradient path then."""
    return x if keep is None else x.masked_fill(~keep.unsqueeze(-1), 0.0)


def _padding(keep: Tensor | None, logits: Tensor, mask: Tensor | None) -> Tensor | None:
    """The rows a label-reading loss zeroes: those ``keep`` drops, for token logits or a mask.

    Labels (-1, -100) on ``[B, C]`` logits without a mask drop samples, not padding; those logits
    are left as they are, so the Distiller's terms on them still share one softmax.
    """
    return keep if logits.dim() == 3 or mask is not None else None


def _soft_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, keep: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(log p_s, log p_t)`` with ``p = softmax(z / T)``, dropped rows zeroed first."""
    student_logits, teacher_logits = _drop(student_logits, keep), _drop(teacher_logits, keep)
    return log_softmax(student_logits, temperature), log_softmax(teacher_logits, temperature)


def _teacher_support(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """The student's logits with the classes the teacher rules out (``-inf``) set to ``-inf``."""
    return torch.where(torch.isneginf(teacher_logits), teacher_logits, student_logits)


def _floor(log_p: Tensor) -> Tensor:
    """``log_p`` with ``-inf`` (masked classes) raised to the dtype's minimum: in
    ``exp(t) * (t - input)`` that keeps ``0 log 0 = 0`` and the gradients finite."""
    return log_p.clamp(min=torch.finfo(log_p.dtype).min)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` over the last dim, with ``0 log 0 = 0``."""
    # One fused kernel, exp(t) * (t - input).
    return F.kl_div(_floor(log_q), _floor(log_p), reduction="none", log_target=True).sum(dim=-1)


def _kl_mean(log_p: Tensor, log_q: Tensor, scale: float = 1.0) -> Tensor:
    """``scale`` times the mean of :func:`_kl_rows` over all rows: one summing kernel and one
    multiplication by ``scale / N`` (``batchmean`` and then a scale would be two)."""
    log_q, log_p = _rows(_floor(log_q)), _rows(_floor(log_p))
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) * (scale / log_q.shape[0])


def _kl_mean_to_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, scale: float
) -> Tensor:
    """:func:`_kl_mean` of the softened teacher and student, with the teacher's side as
    probabilities ``p_t``: ``p_t log p_t - p_t log q`` is 0 where ``p_t`` is, so only the
    student's log-probabilities need the floor (a kernel fewer than two floors). For a teacher
    without gradient only: ``d(p log p)/dp`` is infinite at ``p = 0``."""
    log_q = _rows(_floor(log_softmax(student_logits, temperature)))
    p_t = _rows(_scaled(teacher_logits, temperature).softmax(-1))
    return F.kl_div(log_q, p_t, reduction="sum") * (scale / log_q.shape[0])


def _rows(x: Tensor) -> Tensor:
    """``[..., C] -> [N, C]`` (no view op for a 2-D ``x``: a node fewer in the graph)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _cross_entropy_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``H(p, q) = -sum_c p_c log q_c`` over the last dim, with ``0 log 0 = 0``."""
    p = log_p.exp()
    safe_log_q = torch.where(p > 0, log_q, torch.zeros_like(log_q))
    return -(p * safe_log_q).sum(dim=-1)


def _check_layers(student: Sequence[Tensor], teacher: Sequence[Tensor], what: str) -> None:
    if len(student) != len(teacher):
        raise ValueError(
            f"{what}: got {len(student)} student hidden states but {len(teacher)} teacher hidden "
            "states; pass one student tensor per teacher tensor (kdkit.capture.map_layers pairs "
            "layers of different depth)"
        )
    if len(student) == 0:
        raise ValueError(f"{what}: got no hidden states; pass at least one (student, teacher) pair")


def _feature_dim(x: Tensor, where: str) -> int:
    if x.dim() == 4:
        return 1
    if x.dim() in (2, 3):
        return -1
    raise ValueError(
        f"{where} has shape {tuple(x.shape)}; hidden states must be [B, D], [B, L, D] "
        "or [B, C, H, W]"
    )


def _check_same_shape(s: Tensor, t: Tensor, index: int, what: str) -> None:
    if s.shape != t.shape:
        raise ValueError(
            f"{what}: hidden state {index} has student shape {tuple(s.shape)} but teacher shape "
            f"{tuple(t.shape)}; use MSEHiddenStatesLoss(need_mapping=True, "
            "student_hidden_state_dim=..., teacher_hidden_state_dim=...) or put an adapter "
            "(kdkit.adapters.build_adapter) on the student side"
        )


def _token_keep(states: Tensor, mask: Tensor, where: str) -> Tensor:
    """The checked mask of token states ``[B, L, D]`` (the only shape a token mask fits)."""
    if states.dim() != 3:
        raise ValueError(
            f"{where}: a token mask needs token states [B, L, D], got shape "
            f"{tuple(states.shape)}; drop mask= for [B, D] or [B, C, H, W] features"
        )
    return check_mask(mask, states.shape[:-1], states.device)


def _per_sample(values: Tensor) -> Tensor:
    """Mean over every dim but the batch dim: ``[B, ...] -> [B]``."""
    # the explicit width, not -1: an empty batch [0, ...] cannot infer it
    return values.reshape(values.shape[0], math.prod(values.shape[1:])).mean(dim=1)


def _average(values: list[Tensor]) -> Tensor:
    """The mean of a few tensors: summed one by one (no stack, a kernel per layer fewer)."""
    return values[0] if len(values) == 1 else sum(values[1:], values[0]) / len(values)


def _layer_mean(
    per_layer: list[Tensor],
    keep: Tensor | None,
    reduction: str,
    num_items_in_batch: Count,
    what: str,
) -> Tensor:
    """The mean over layers of the reduced per-layer values (of the values, for ``"none"``).

    ``per_layer`` holds each layer's values per entry: ``[B, ...]``, or ``[B, L]`` per token with
    a token mask (``keep``). Without one, a layer's value per sample is the mean of its entries.
    """
    if keep is None:
        if all(plain_mean(v, keep, reduction, num_items_in_batch) for v in per_layer):
            # Every sample has as many entries, so the mean of the per-sample means is the mean
            # of all entries: one kernel per layer.
            return _average([v.mean() for v in per_layer])
        per_layer = [_per_sample(v) for v in per_layer]
    if reduction != "none":
        return _average([reduce(v, keep, reduction, num_items_in_batch) for v in per_layer])
    shapes = {tuple(v.shape) for v in per_layer}
    if len(shapes) > 1:
        raise ValueError(
            f"{what}: reduction='none' averages per-sample values over the layers, but the "
            f"layers give values of shapes {sorted(shapes)} (batch sizes differ); pass layers "
            "of one batch, or use reduction='mean' / 'sum'"
        )
    return reduce(torch.stack(per_layer).mean(dim=0), keep, reduction)


# --------------------------------------------------------------------------------------------
# logit losses
# --------------------------------------------------------------------------------------------


def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Soft-target KL divergence of Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network".

    ``loss = T^2 * mean_n KL(p_t || p_s) = T^2 * mean_n sum_c p_t,c (log p_t,c - log p_s,c)``,
    ``p = softmax(z / T)``, mean over samples (``batchmean``) or over the tokens kept by ``mask``.

    The gradient is ``dloss/dz_s = T (p_s - p_t) / N`` for ``N`` samples. Classes the teacher
    masks (``-inf``) contribute ``0 log 0 = 0``.
    """
    if validate_args:
        temperature = check_temperature(temperature)
        check_reduction(reduction, "kl_div")
    check_logits(student_logits, teacher_logits)
    keep = _keep(mask, student_logits)
    plain = plain_mean(student_logits, keep, reduction, num_items_in_batch)
    if plain and not teacher_logits.requires_grad:
        return _kl_mean_to_probs(student_logits, teacher_logits, temperature, temperature**2)
    log_p_s, log_p_t = _soft_log_probs(student_logits, teacher_logits, temperature, keep)
    if plain:
        return _kl_mean(log_p_t, log_p_s, temperature**2)
    rows = temperature**2 * _kl_rows(log_p_t, log_p_s)
    return reduce(rows, keep, reduction, num_items_in_batch)


def reverse_kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Reverse (mode-seeking) KL, as used for LLM distillation by Gu et al. 2024, "MiniLLM:
    Knowledge Distillation of Large Language Models".

    ``loss = T^2 * mean_n KL(p_s || p_t) = T^2 * mean_n sum_c p_s,c (log p_s,c - log p_t,c)``.

    Classes the teacher masks (``-inf`` logit, e.g. a restricted vocabulary) make the true value
    ``+inf`` wherever the student gives them any mass. kdkit masks the student's logits to the
    teacher's support instead: ``p_s`` is the student's softmax renormalised over the classes the
    teacher allows, so value and gradients stay finite and the forbidden classes get no gradient.
    (Summing only over the teacher's support without renormalising would have a degenerate
    minimum: the student could park its mass on the forbidden classes and drive the loss to 0.)
    Classes only the student masks contribute ``0 log 0 = 0``.
    """
    if validate_args:
        temperature = check_temperature(temperature)
        check_reduction(reduction, "reverse_kl_div")
    check_logits(student_logits, teacher_logits)
    keep = _keep(mask, student_logits)
    student_logits = _teacher_support(student_logits, teacher_logits)
    log_p_s, log_p_t = _soft_log_probs(student_logits, teacher_logits, temperature, keep)
    if plain_mean(student_logits, keep, reduction, num_items_in_batch):
        return _kl_mean(log_p_s, log_p_t, temperature**2)
    rows = temperature**2 * _kl_rows(log_p_s, log_p_t)
    return reduce(rows, keep, reduction, num_items_in_batch)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Generalized Jensen-Shannon divergence of Agarwal et al. 2024, "On-Policy Distillation of
    Language Models: Learning from Self-Generated Mistakes" (GKD).

    Convention of TRL's ``GKDTrainer.generalized_jsd_loss``:
    ``m = beta * p_t + (1 - beta) * p_s`` and
    ``JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` for ``0 < beta < 1``;
    ``beta = 0`` is exactly forward ``KL(p_t || p_s)`` and ``beta = 1`` exactly reverse
    ``KL(p_s || p_t)`` (the endpoints are special-cased: the formula itself tends to 0 there).
    ``loss = T^2 * mean_n JSD_beta`` (TRL does not multiply by ``T^2``; kdkit does for every soft
    loss, so ``beta = 0`` equals :func:`kl_div` exactly).

    For ``0 < beta < 1`` the value is finite even where the teacher masks classes (``m`` covers
    every class of ``p_s``); ``beta = 1`` restricts the student to the teacher's support as
    :func:`reverse_kl_div` does.
    """
    if validate_args:
        beta = check_jsd_beta(beta)
        temperature = check_temperature(temperature)
        check_reduction(reduction, "generalized_jsd")
    if beta == 1.0:
        return reverse_kl_div(
            student_logits,
            teacher_logits,
            temperature,
            mask,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
            validate_args=False,
        )
    check_logits(student_logits, teacher_logits)
    keep = _keep(mask, student_logits)
    log_p_s, log_p_t = _soft_log_probs(student_logits, teacher_logits, temperature, keep)
    if beta == 0.0:
        rows = _kl_rows(log_p_t, log_p_s)
    else:
        log_m = _log_mixture(log_p_t, log_p_s, beta)
        rows = beta * _kl_rows(log_p_t, log_m) + (1.0 - beta) * _kl_rows(log_p_s, log_m)
    return reduce(temperature**2 * rows, keep, reduction, num_items_in_batch)


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Soft-target cross-entropy of Hinton et al. 2015.

    ``loss = T^2 * mean_n H(p_t, p_s) = -T^2 * mean_n sum_c p_t,c log p_s,c``. It equals
    :func:`kl_div` plus ``T^2`` times the teacher's entropy, so it has the same gradient in the
    student but is not 0 when student and teacher agree.
    """
    if validate_args:
        temperature = check_temperature(temperature)
        check_reduction(reduction, "soft_cross_entropy")
    check_logits(student_logits, teacher_logits)
    keep = _keep(mask, student_logits)
    log_p_s, log_p_t = _soft_log_probs(student_logits, teacher_logits, temperature, keep)
    rows = temperature**2 * _cross_entropy_rows(log_p_t, log_p_s)
    return reduce(rows, keep, reduction, num_items_in_batch)


def _is_soft_target(target: Tensor, logits: Tensor) -> bool:
    """Whether ``target`` holds class probabilities (mixup); class indices are checked."""
    if target.dtype.is_floating_point and target.shape == logits.shape:
        return True
    check_hard_target(target, logits)
    return False


def _label_rows(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``-Σ y log softmax(z)`` for class-probability targets ``y`` (mixup)."""
    log_q = log_softmax(logits, 1.0)
    return -(target.to(log_q.dtype) * log_q).sum(dim=-1)


def _hard_cross_entropy(
    logits: Tensor, target: Tensor, keep: Tensor, reduction: str = "none"
) -> Tensor:
    """Per-sample ``-log softmax(z)[y]`` for class indices, 0 where ``keep`` drops the sample
    (``"none"``), or the sum over the kept samples (``"sum"``).

    One ``nll_loss`` kernel, as in ``F.cross_entropy``: the dropped samples (negative labels)
    get its ``ignore_index``.
    """
    log_q = _rows(log_softmax(logits, 1.0))
    safe = torch.where(keep, target, _IGNORE_INDEX)
    safe = safe if safe.dim() == 1 else safe.reshape(-1)
    nll = _nll_loss(log_q, safe, ignore_index=_IGNORE_INDEX, reduction=reduction)
    return nll if reduction == "sum" or target.dim() == 1 else nll.view(target.shape)


def _nll_loss(
    log_q: Tensor, target: Tensor, ignore_index: int = _IGNORE_INDEX, reduction: str = "mean"
) -> Tensor:
    """``F.nll_loss``, with a class index out of range named in a ValueError (on the CPU torch
    raises a bare IndexError; on an accelerator it is a device-side assert)."""
    try:
        return F.nll_loss(log_q, target, ignore_index=ignore_index, reduction=reduction)
    except IndexError as e:
        classes = log_q.shape[-1]
        raise ValueError(
            f"target holds class index {int(target.max())} but the logits have {classes} "
            f"classes (valid: 0..{classes - 1}; negative labels mark unlabeled samples and "
            "padding); check the labels and the model's number of classes."
        ) from e


def hinton_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 0.1,
    beta: float = 0.9,
    temperature: float = 4.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Combined distillation loss of Hinton et al. 2015 (the seed lecture's formulation).

    ``loss = alpha * H(y, softmax(z_s)) + beta * T^2 * H(softmax(z_t / T), softmax(z_s / T))``:
    the hard "student loss" at ``T = 1`` plus the soft cross-entropy with the teacher.

    ``target`` holds class indices shaped like the logits without the class dim, or class
    probabilities shaped like the logits (e.g. from mixup). Negative indices mark samples without
    a label (kdkit's unlabeled transfer sets use -1): they get the soft term only, the hard term
    averages over the labelled ones. -100 (``F.cross_entropy``'s ignore_index, padding tokens)
    and ``mask`` drop the sample / token from both terms; for token logits ``[B, L, C]`` (or
    with a mask) its logits are zeroed first, so NaN/Inf there reaches no gradient.

    ``reduction="none"`` gives ``alpha * hard_n + beta * T^2 * soft_n`` per sample (hard_n = 0
    for unlabeled samples). ``"mean"`` averages each term over its own samples, so with
    unlabeled (-1) samples it is not the mean of those values; ``num_items_in_batch`` replaces
    both denominators.
    """
    if validate_args:
        alpha = check_weight("alpha", alpha)
        beta = check_weight("beta", beta)
        temperature = check_temperature(temperature)
        check_reduction(reduction, "hinton_loss")
    check_logits(student_logits, teacher_logits)
    soft_target = _is_soft_target(target, student_logits)
    keep = _both(None if soft_target else target != -100, _keep(mask, student_logits))
    labeled = keep if soft_target else _both(target >= 0, keep)
    padding = _padding(keep, student_logits, mask)
    s, t = _drop(student_logits, padding), _drop(teacher_logits, padding)
    hard = _label_rows(s, target) if soft_target else _hard_cross_entropy(s, target, labeled)
    log_p_s, log_p_t = log_softmax(s, temperature), log_softmax(t, temperature)
    soft = temperature**2 * _cross_entropy_rows(log_p_t, log_p_s)
    if reduction == "mean":
        return alpha * reduce(hard, labeled, "mean", num_items_in_batch) + beta * reduce(
            soft, keep, "mean", num_items_in_batch
        )
    return reduce(alpha * hard + beta * soft, keep, reduction)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Cross-entropy with the ground truth over the labelled samples only.

    ``loss = mean_{i: y_i >= 0} -log softmax(z_i)[y_i]``; negative labels mark unlabeled samples
    of a transfer set (kdkit uses -1) and padding (-100). With no labelled sample the loss is 0
    (not NaN), so a batch drawn only from the unlabeled part trains on the soft terms alone.
    ``target`` may also hold class probabilities shaped like ``logits`` (mixup). The logits of
    tokens left out of token logits ``[B, L, C]`` (or by a mask) are zeroed first, so NaN/Inf
    there reaches no gradient.
    """
    if validate_args:
        check_reduction(reduction, "cross_entropy")
    soft_target = _is_soft_target(target, logits)
    if not soft_target and _all_labeled_on_cpu(target, mask, reduction, num_items_in_batch):
        # F.cross_entropy's two kernels, with the log-softmax shared with other terms at T = 1
        log_q = _rows(log_softmax(logits, 1.0))
        return _nll_loss(log_q, target if target.dim() == 1 else target.reshape(-1))
    keep = _keep(mask, logits)
    if not soft_target:
        keep = _both(target >= 0, keep)
    logits = _drop(logits, _padding(keep, logits, mask))
    if soft_target:
        return reduce(_label_rows(logits, target), keep, reduction, num_items_in_batch)
    if reduction == "none":
        return _hard_cross_entropy(logits, target, keep)
    total = _hard_cross_entropy(logits, target, keep, "sum")
    return reduce_sum(total, keep, reduction, num_items_in_batch, target.numel())


def _all_labeled_on_cpu(
    target: Tensor, mask: Tensor | None, reduction: str, num_items_in_batch: Count
) -> bool:
    """Whether a plain mean over CPU labels that are all >= 0: then ``F.nll_loss`` alone.

    On the CPU, reading the smallest label waits for nothing; on an accelerator it would stall
    the step, so there the general path (which needs no read) runs.
    """
    plain = plain_mean(target, mask, reduction, num_items_in_batch)
    return plain and target.is_cpu and int(target.min()) >= 0


def mse_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Logit matching, the high-temperature limit of Hinton et al. 2015 (Ba & Caruana 2014).

    ``loss = mean_n mean_c (z_s - z_t)^2`` over the kept samples / tokens ``n`` and the classes
    ``c`` of each.

    Its gradient is ``2 (z_s - z_t) / (B * C)``. For zero-mean logits the gradient of
    ``T^2 * KL(p_t || p_s)`` tends to ``(z_s - z_t) / (B * C)`` as ``T -> inf``, so this loss
    is that limit with twice the gradient.

    Masked classes: a class whose logit is ``-inf`` in both models (a masked vocabulary) is
    left out of its row's class mean and gets no gradient. A class ``-inf`` in one model only has
    an infinite squared difference: that is refused with an error.
    """
    if validate_args:
        check_reduction(reduction, "mse_logits")
    check_logits(student_logits, teacher_logits)
    keep = _keep(mask, student_logits)
    s, t = _drop(_upcast(student_logits), keep), _drop(_upcast(teacher_logits), keep)
    masked_s, masked_t = torch.isneginf(s), torch.isneginf(t)
    if bool((masked_s != masked_t).any()):
        teacher_only = bool((masked_t & ~masked_s).any())
        side, other = ("teacher", "student") if teacher_only else ("student", "teacher")
        raise ValueError(
            f"mse_logits: some classes are -inf in the {side} logits only (finite in the "
            f"{other}'s), where the squared difference is infinite. Mask the same classes in "
            f"both (e.g. {other}_logits.masked_fill({side}_logits == float('-inf'), "
            "float('-inf'))), or use KLDivLoss / ReverseKLDivLoss, which handle classes masked "
            "in one model"
        )
    diff = (s - t).masked_fill(masked_s, 0.0)
    classes = (~masked_s).sum(dim=-1).clamp(min=1)
    rows = diff.pow(2).sum(dim=-1) / classes
    return reduce(rows, keep, reduction, num_items_in_batch)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Decoupled Knowledge Distillation of Zhao et al., CVPR 2022 (``dkd_loss`` of mdistiller).

    With ``p = softmax(z / T)`` and ``g`` the target class:

    * TCKD = ``KL(b_t || b_s)``, ``b = [p_g, 1 - p_g]`` (target vs. all non-target classes);
    * NCKD = ``KL(p~_t || p~_s)``, ``p~ = softmax over the non-target classes only``;

    ``loss = T^2 * mean_n (alpha * TCKD + beta * NCKD)``. Samples with a negative label
    (unlabeled, or ignore_index -100) or dropped by ``mask`` have no target class: they are left
    out of the mean; for token logits ``[B, L, C]`` (or with a mask) their logits (student's and
    teacher's) are zeroed first, so NaN/Inf there reaches no gradient.

    mdistiller removes the target class from NCKD by subtracting 1000 from its logit ``/ T``;
    kdkit drops it exactly. Measured in float32 against float64: mdistiller's NCKD agrees while
    the target logit leads the others by less than ~980·T (beyond, the -1000 no longer removes
    the target class); mdistiller's own TCKD breaks first: it takes the log of the summed
    non-target probability, which underflows once the target leads by ~88·T (``exp(-88)`` is
    float32's smallest normal number; NaN from ~104·T where subnormals are kept). kdkit
    computes both terms in log space and stays finite.
    """
    if validate_args:
        alpha = check_weight("alpha", alpha)
        beta = check_weight("beta", beta)
        temperature = check_temperature(temperature)
        check_reduction(reduction, "dkd")
    check_logits(student_logits, teacher_logits)
    check_hard_target(target, student_logits)
    num_classes = student_logits.shape[-1]
    if target.numel() and int(target.max()) >= num_classes:
        raise ValueError(
            f"dkd: target holds class index {int(target.max())} but the logits have "
            f"{num_classes} classes (valid: 0..{num_classes - 1}, negative = unlabeled)"
        )
    keep = target >= 0
    if mask is not None:
        keep = keep & check_mask(mask, target.shape, target.device)
    padding = _padding(keep, student_logits, mask)
    log_p_s, log_p_t = _soft_log_probs(student_logits, teacher_logits, temperature, padding)
    gt = F.one_hot(torch.where(keep, target, 0).long(), num_classes).bool()
    neg_inf = torch.full_like(log_p_s, float("-inf"))

    def binary(log_p: Tensor) -> Tensor:
        log_gt = torch.where(gt, log_p, neg_inf).logsumexp(dim=-1)
        log_other = torch.where(gt, neg_inf, log_p).logsumexp(dim=-1)
        return torch.stack([log_gt, log_other], dim=-1)

    tckd = _kl_rows(binary(log_p_t), binary(log_p_s))
    # log_softmax over the non-target classes = log p minus the log of their total mass.
    non_target_s = torch.where(gt, neg_inf, log_p_s)
    non_target_t = torch.where(gt, neg_inf, log_p_t)
    nckd = _kl_rows(
        non_target_t - non_target_t.logsumexp(dim=-1, keepdim=True),
        non_target_s - non_target_s.logsumexp(dim=-1, keepdim=True),
    )
    rows = temperature**2 * (alpha * tckd + beta * nckd)
    return reduce(rows, keep, reduction, num_items_in_batch)


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    *,
    mask: Tensor | None = None,
    validate_args: bool = True,
) -> Tensor:
    """DIST of Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher".

    With ``Y = softmax(z / T)`` as ``[N, C]`` matrices and ``rho`` the Pearson correlation:
    ``inter = 1 - mean_n rho(Y_s[n, :], Y_t[n, :])`` (class ranking of each sample),
    ``intra = 1 - mean_c rho(Y_s[:, c], Y_t[:, c])`` (each class across the batch),
    ``loss = T^2 * (beta * inter + gamma * intra)``.

    Token logits ``[B, L, C]`` are flattened to the ``N`` tokens ``mask`` keeps (all ``B * L``
    without a mask, so pass the mask when the batch holds padding: padding would enter both
    correlations). The loss relates the samples of a batch to each other, so it has no
    per-sample value.
    """
    if validate_args:
        beta = check_weight("beta", beta)
        gamma = check_weight("gamma", gamma)
        temperature = check_temperature(temperature)
    check_logits(student_logits, teacher_logits)
    keep = _keep(mask, student_logits)
    if keep is not None:
        # Indexing before the softmax: dropped rows get an exact zero gradient, NaN or not.
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]
    if student_logits.numel() == 0:  # nothing kept: 0, not the NaN of an empty correlation
        return student_logits.sum()
    num_classes = student_logits.shape[-1]
    y_s = log_softmax(student_logits, temperature).exp().reshape(-1, num_classes)
    y_t = log_softmax(teacher_logits, temperature).exp().reshape(-1, num_classes)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


# --------------------------------------------------------------------------------------------
# feature losses
# --------------------------------------------------------------------------------------------
# Per-sample values: the mean over every non-batch dim, [B]; with a token mask over token states
# [B, L, D], per-token values [B, L]. Several layers: the mean of the layers' values.


def mse_hidden_states(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    normalize: bool = False,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Hint / hidden-state MSE (Romero et al. 2015, "FitNets"; Jiao et al. 2020, "TinyBERT").

    ``loss = mean_l mean((f(h_s,l) - f(h_t,l))^2)`` where ``f`` is the identity, or, with
    ``normalize=True``, L2 normalisation over the feature dim (last dim of ``[B, D]`` /
    ``[B, L, D]``, channel dim of ``[B, C, H, W]``). Shapes must match per layer. For token
    states ``[B, L, D]`` a bool ``mask`` ``[B, L]`` averages over the kept tokens only.
    """
    if validate_args:
        check_reduction(reduction, "mse_hidden_states")
    _check_layers(student, teacher, "mse_hidden_states")
    # The plain mean: F.mse_loss's own mean, one kernel forward and backward per layer (its
    # "none" values and a mean over them cost a full-size division in the backward).
    fused = mask is None and all(
        plain_mean(s, None, reduction, num_items_in_batch) for s in student
    )
    keep = None
    per_layer = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        dim = _feature_dim(s, f"mse_hidden_states: student hidden state {i}")
        _check_same_shape(s, t, i, "mse_hidden_states")
        s, t = _upcast(s), _upcast(t)
        if mask is not None:
            keep = _token_keep(s, mask, f"mse_hidden_states layer {i}")
            s, t = _drop(s, keep), _drop(t, keep)
        if normalize:
            s, t = F.normalize(s, dim=dim), F.normalize(t, dim=dim)
        if fused:
            per_layer.append(F.mse_loss(s, t))
            continue
        squared = F.mse_loss(s, t, reduction="none")
        per_layer.append(squared.mean(dim=-1) if keep is not None else squared)
    if fused:
        return _average(per_layer)
    return _layer_mean(per_layer, keep, reduction, num_items_in_batch, "mse_hidden_states")


def cosine_hidden_states(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Cosine hidden-state loss (as in DistilBERT, Sanh et al. 2019).

    ``loss = mean_l mean(1 - cos(h_s,l, h_t,l))``, cosine over the feature dim (last dim of
    ``[B, D]`` / ``[B, L, D]``, channel dim of ``[B, C, H, W]``), mean over the other positions
    (over the tokens a bool ``mask`` ``[B, L]`` keeps, for token states).
    """
    if validate_args:
        check_reduction(reduction, "cosine_hidden_states")
    _check_layers(student, teacher, "cosine_hidden_states")
    keep = None
    per_layer = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        dim = _feature_dim(s, f"cosine_hidden_states: student hidden state {i}")
        _check_same_shape(s, t, i, "cosine_hidden_states")
        s, t = _upcast(s), _upcast(t)
        if mask is not None:
            keep = _token_keep(s, mask, f"cosine_hidden_states layer {i}")
            s, t = _drop(s, keep), _drop(t, keep)
        per_layer.append(1.0 - F.cosine_similarity(s, t, dim=dim))
    return _layer_mean(per_layer, keep, reduction, num_items_in_batch, "cosine_hidden_states")


def _attention_map(feature: Tensor, p: float) -> Tensor:
    x = _upcast(feature)
    # |x|^p = x^p for an even p: no abs (and no sign in its backward).
    powered = x.pow(p) if p % 2 == 0 else x.abs().pow(p)
    return F.normalize(powered.mean(dim=1).flatten(1), dim=1)


def attention_map(feature: Tensor, p: float = 2) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to
    Attention".

    ``a = normalize(flatten(mean_c |F_c|^p))``: ``[B, C, H, W] -> [B, H * W]``, unit L2 norm per
    sample (mean or sum over channels give the same map after normalisation).
    """
    if feature.dim() != 4:
        raise ValueError(
            f"attention_map needs a feature map [B, C, H, W], got shape {tuple(feature.shape)}"
        )
    return _attention_map(feature, check_attention_p(p))


def attention_transfer(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    p: float = 2,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Attention transfer loss of Zagoruyko & Komodakis, ICLR 2017.

    ``loss = mean_l mean((a(F_s,l) - a(F_t,l))^2)`` with ``a`` = :func:`attention_map`. Channel
    counts may differ; where spatial sizes differ, the larger map is adaptive-average-pooled to
    the smaller size first. (The paper weights this term by ``beta = 1000``; set that as the
    term's weight.) Invariant to rescaling either feature map.
    """
    if validate_args:
        p = check_attention_p(p)
        check_reduction(reduction, "attention_transfer")
    _check_layers(student, teacher, "attention_transfer")
    per_layer = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"attention_transfer: hidden state {i} has student shape {tuple(s.shape)} and "
                f"teacher shape {tuple(t.shape)}; both must be [B, C, H, W] with the same batch "
                "size B (channels and H, W may differ)"
            )
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        if tuple(s.shape[2:]) != size:
            s = F.adaptive_avg_pool2d(s, size)
        if tuple(t.shape[2:]) != size:
            t = F.adaptive_avg_pool2d(t, size)
        per_layer.append((_attention_map(s, p) - _attention_map(t, p)).pow(2))
    return _layer_mean(per_layer, None, reduction, num_items_in_batch, "attention_transfer")


def _flat_batch(student: Tensor, teacher: Tensor, what: str) -> tuple[Tensor, Tensor]:
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} and teacher shape "
            f"{tuple(teacher.shape)} must both be [B, ...] with the same batch size B "
            "(feature sizes may differ)"
        )
    return _upcast(student).flatten(1), _upcast(teacher).flatten(1)


def pkt(student_features: Tensor, teacher_features: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic Knowledge Transfer of Passalis & Tefas, ECCV 2018 (RepDistiller's PKT).

    Features are flattened to ``[B, D]`` and L2-normalised; the cosine kernel
    ``K_ij = (cos(x_i, x_j) + 1) / 2`` is row-normalised into conditional probabilities
    ``P_ij = K_ij / sum_j K_ij``; ``loss = mean_ij P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))``
    (mean over all ``B * B`` entries). Student and teacher dims may differ.
    """
    s, t = _flat_batch(student_features, teacher_features, "pkt")
    if s.shape[0] == 0:  # an empty batch: 0, not the NaN of an empty mean
        return s.sum()

    def conditional(x: Tensor) -> Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        kernel = (x @ x.t() + 1.0) / 2.0
        return kernel / kernel.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(s), conditional(t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    sq = x.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * x @ x.t()).clamp(min=eps)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    # The clamp keeps sqrt's gradient finite on the diagonal; the diagonal itself is 0.
    return torch.where(eye, torch.zeros_like(d2), d2.sqrt())


def rkd(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    *,
    validate_args: bool = True,
) -> Tensor:
    """Relational Knowledge Distillation of Park et al., CVPR 2019.

    Distance-wise: ``psi_D(i, j) = ||x_i - x_j|| / mu`` with ``mu`` the mean of the non-zero
    pairwise distances; angle-wise: ``psi_A(i, j, k) = <e_ij, e_kj>`` with
    ``e_ij = (x_i - x_j) / ||x_i - x_j||``. ``loss = distance_weight * smoothL1(psi_D^s, psi_D^t)
    + angle_weight * smoothL1(psi_A^s, psi_A^t)`` (element means). Embeddings are flattened to
    ``[B, D]``; student and teacher dims may differ.
    """
    if validate_args:
        distance_weight = check_weight("distance_weight", distance_weight)
        angle_weight = check_weight("angle_weight", angle_weight)
    s, t = _flat_batch(student_embeddings, teacher_embeddings, "rkd")
    if s.shape[0] == 0:  # an empty batch: 0, not the NaN of an empty mean
        return s.sum()
    t = t.detach()  # the teacher's relations are targets, as in the reference implementation

    def distances(x: Tensor) -> Tensor:
        d = _pairwise_distances(x)
        positive = d > 0
        return d / d[positive].mean() if bool(positive.any()) else d

    def angles(x: Tensor) -> Tensor:
        e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
        return torch.bmm(e, e.transpose(1, 2)).flatten()

    loss_d = F.smooth_l1_loss(distances(s), distances(t))
    loss_a = F.smooth_l1_loss(angles(s), angles(t))
    return distance_weight * loss_d + angle_weight * loss_a


# --------------------------------------------------------------------------------------------
# transformer losses
# --------------------------------------------------------------------------------------------
# Inputs are flat lists, a fixed number of tensors per layer: projections [B, L, H * d] (the
# outputs of the attention's query / key / value nn.Linear) in the order each loss names, or,
# for minilm_attention, the attention probabilities [B, H, L, L] of a layer. The bool mask
# [B, L] is the attention mask: padded keys leave the distributions (as in the models), padded
# queries leave the mean. Per-token values [B, L] with a mask, per-sample [B] without.

_NO_PROBABILITIES = (
    "Hugging Face models return no attention probabilities without output_attentions=True, nor "
    "with the default sdpa (or flash) attention: output.attentions is then empty and the "
    "attention module returns None for its weights. Capture the "
    "query/key projections instead (e.g. encoder.layer.{i}.attention.self.query and .key), "
    "which works with any attention implementation, or build the model with "
    "attn_implementation='eager'"
)


def _check_layer_counts(num_student: int, num_teacher: int, what: str) -> None:
    if num_student != num_teacher:
        raise ValueError(
            f"{what}: got {num_student} student layers but {num_teacher} teacher layers; pass "
            "one student layer per teacher layer (kdkit.capture.map_layers pairs layers)"
        )


def _layer_groups(
    tensors: Sequence[Tensor], size: int, names: str, what: str
) -> list[list[Tensor]]:
    """Split a flat list into layers of ``size`` projections ``[B, L, H * d]`` each."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError(
            f"{what}: got no tensors; pass {names} for each layer. {_NO_PROBABILITIES}"
        )
    for i, x in enumerate(tensors):
        if not isinstance(x, Tensor) or x.numel() == 0:
            raise ValueError(
                f"{what}: entry {i} is {'None' if x is None else 'empty'}. {_NO_PROBABILITIES}"
            )
        if x.dim() != 3:
            raise ValueError(
                f"{what}: entry {i} has shape {tuple(x.shape)}; expected {names} projections "
                "[B, L, H * d] (the attention's nn.Linear outputs), one after the other per layer"
            )
    if len(tensors) % size:
        raise ValueError(
            f"{what}: got {len(tensors)} tensors, not a multiple of {size}; pass {names} for "
            f"each layer, in that order"
        )
    return [[_upcast(x) for x in tensors[i : i + size]] for i in range(0, len(tensors), size)]


def _attention_keep(x: Tensor, mask: Tensor | None) -> Tensor | None:
    return None if mask is None else check_mask(mask, x.shape[:2], x.device)


def _check_maps(s: Tensor, t: Tensor, index: int, what: str) -> None:
    """Per-head ``[B, H, L, L]`` maps of one layer pair: the same shape."""
    if s.shape != t.shape:
        raise ValueError(
            f"{what}: layer {index} gives student maps {tuple(s.shape)} but teacher maps "
            f"{tuple(t.shape)} ([B, heads, L, L]); both models must see the same batch (same "
            "sequence length and padding) and have the same number of heads"
        )


def _map_keep(maps: list[Tensor], mask: Tensor | None) -> Tensor | None:
    """The query mask of ``[B, H, L, L]`` maps."""
    if mask is None:
        return None
    return check_mask(mask, (maps[0].shape[0], maps[0].shape[-1]), maps[0].device)


def _per_query(values: Tensor, keep: Tensor | None) -> Tensor:
    """``[B, H, L]`` per-query values -> mean over heads ``[B, L]`` with a mask, else ``[B]``."""
    per_token = values.mean(dim=1)
    return per_token if keep is not None else per_token.mean(dim=1)


def _kl_maps(
    student: list[Tensor],
    teacher: list[Tensor],
    keep: Tensor | None,
    reduction: str,
    num_items_in_batch: Count,
    what: str,
) -> Tensor:
    """Mean over layers, heads and kept queries of ``KL(teacher row || student row)``."""
    _check_layer_counts(len(student), len(teacher), what)
    per_layer = []
    for i, (log_s, log_t) in enumerate(zip(student, teacher, strict=True)):
        _check_maps(log_s, log_t, i, what)
        per_layer.append(_per_query(_kl_rows(log_t, log_s), keep))
    return _layer_mean(per_layer, keep, reduction, num_items_in_batch, what)


def _query_key(tensors: Sequence[Tensor], what: str, side: str) -> list[list[Tensor]]:
    for x in tensors:
        if isinstance(x, Tensor) and x.dim() == 4:
            raise ValueError(
                f"{what}: the {side} gives a 4-D tensor of shape {tuple(x.shape)}, probably "
                "attention probabilities; TinyBERT compares the pre-softmax scores, which no "
                "model output holds: pass the query and key projections [B, L, H * d] of each "
                "layer (e.g. encoder.layer.{i}.attention.self.query and .key)"
            )
    return _layer_groups(tensors, 2, "query, key", f"{what} ({side})")


def _scores(layer: list[Tensor], num_heads: int, mask: Tensor | None) -> Tensor:
    """Pre-softmax scores of one layer; padded tokens zeroed first so NaN there has no gradient."""
    query, key = layer
    keep = _attention_keep(query, mask)
    return attention_scores(_drop(query, keep), _drop(key, keep), num_heads)


def tinybert_attention(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    student_heads: int,
    teacher_heads: int | None = None,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Attention-score MSE of Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language
    Understanding".

    ``loss = mean_l mean_{b,i} mean_{h,j} (S^s_{l,h,ij} - S^t_{l,h,ij})^2`` with the pre-softmax
    scores ``S_h = Q_h K_h^T / sqrt(d_h)`` (:func:`kdkit.attention.attention_scores`), over kept
    queries ``i`` and kept keys ``j``. ``student`` / ``teacher``: per layer the query and the key
    projection ``[B, L, H * d]`` (``[q_0, k_0, q_1, k_1, ...]``); hidden sizes may differ, head
    counts may not. TinyBERT's code zeroes the masked scores (``<= -1e2``) of both models and
    takes the mean over all ``L * L`` entries; here masked pairs are left out (the same value
    without padding).
    """
    what = "tinybert_attention"
    if validate_args:
        check_reduction(reduction, what)
        student_heads, teacher_heads = check_same_heads(student_heads, teacher_heads, what)
    s_scores = [
        _scores(layer, student_heads, mask) for layer in _query_key(student, what, "student")
    ]
    t_scores = [
        _scores(layer, teacher_heads, mask) for layer in _query_key(teacher, what, "teacher")
    ]
    _check_layer_counts(len(s_scores), len(t_scores), what)
    keep = _map_keep(s_scores, mask)
    per_layer = []
    for i, (s, t) in enumerate(zip(s_scores, t_scores, strict=True)):
        _check_maps(s, t, i, what)
        squared = (s - t).pow(2)
        if keep is None:
            per_layer.append(_per_query(squared.mean(dim=-1), None))
            continue
        kept_keys = keep.sum(dim=1).clamp(min=1)[:, None, None]
        rows = squared.masked_fill(~keep[:, None, None, :], 0.0).sum(dim=-1) / kept_keys
        per_layer.append(_per_query(rows, keep))
    return _layer_mean(per_layer, keep, reduction, num_items_in_batch, what)


def _log_probabilities(probs: Tensor) -> Tensor:
    """``log p`` with the dtype's minimum where ``p == 0`` (a padded key), as the log-softmax of
    projections gives there, and a finite gradient (the clamp keeps 0 out of ``log``'s)."""
    floor = torch.finfo(probs.dtype)
    return torch.where(probs > 0, probs.clamp(min=floor.tiny).log(), floor.min)


def _attention_distributions(
    tensors: Sequence[Tensor], num_heads: int, mask: Tensor | None, what: str
) -> list[Tensor]:
    """Per layer ``log A``: from a ``(query, key)`` pair, or from probabilities ``[B, H, L, L]``."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{what}: got no tensors. {_NO_PROBABILITIES}")
    layers, i = [], 0
    while i < len(tensors):
        x = tensors[i]
        if not isinstance(x, Tensor) or x.numel() == 0:
            raise ValueError(
                f"{what}: entry {i} is {'None' if x is None else 'empty'}. {_NO_PROBABILITIES}"
            )
        if x.dim() == 4:
            if x.shape[-1] != x.shape[-2] or x.shape[1] != num_heads:
                raise ValueError(
                    f"{what}: entry {i} has shape {tuple(x.shape)}; attention probabilities are "
                    f"[B, H, L, L] with H = {num_heads} heads"
                )
            layers.append(_log_probabilities(_upcast(x)))
            i += 1
            continue
        query, key = _layer_groups(tensors[i : i + 2], 2, "query, key", what)[0]
        keep = _attention_keep(query, mask)
        layers.append(attention_log_probs(_drop(query, keep), _drop(key, keep), num_heads, mask))
        i += 2
    return layers


def minilm_attention(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    student_heads: int,
    teacher_heads: int | None = None,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Self-attention distribution transfer of Wang et al. 2020, "MiniLM: Deep Self-Attention
    Distillation for Task-Agnostic Compression of Pre-Trained Transformers".

    ``loss = mean_l mean_{b,i} mean_h KL(A^t_{l,h,i} || A^s_{l,h,i})`` with
    ``A_h = softmax(Q_h K_h^T / sqrt(d_h) + M)`` over the keys (``M`` masks padded keys), averaged
    over heads and kept queries. Per layer, ``student`` / ``teacher`` hold either the query and
    key projections ``[B, L, H * d]`` (:func:`kdkit.attention.attention_log_probs`; any attention
    implementation) or the attention probabilities ``[B, H, L, L]`` (``output.attentions``, eager
    attention only, after attention dropout). Hidden sizes may differ, head counts may not.
    """
    what = "minilm_attention"
    if validate_args:
        check_reduction(reduction, what)
        student_heads, teacher_heads = check_same_heads(student_heads, teacher_heads, what)
    log_s = _attention_distributions(student, student_heads, mask, f"{what} (student)")
    log_t = _attention_distributions(teacher, teacher_heads, mask, f"{what} (teacher)")
    keep = _map_keep(log_s, mask)
    return _kl_maps(log_s, log_t, keep, reduction, num_items_in_batch, what)


def _relations(
    tensors: Sequence[Tensor], names: Sequence[str], num_heads: int, mask: Tensor | None, what: str
) -> list[Tensor]:
    """``log softmax(X_h X_h^T / sqrt(d_r) + M)`` of every projection, layer by layer."""
    relations = []
    for layer in _layer_groups(tensors, len(names), ", ".join(names), what):
        keep = _attention_keep(layer[0], mask)
        relations.extend(relation_log_probs(_drop(x, keep), num_heads, mask) for x in layer)
    return relations


def minilm_value_relation(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    student_heads: int,
    teacher_heads: int | None = None,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Value-relation transfer of Wang et al. 2020, "MiniLM".

    ``loss = mean_l mean_{b,i} mean_h KL(VR^t_{l,h,i} || VR^s_{l,h,i})`` with
    ``VR_h = softmax(V_h V_h^T / sqrt(d_h) + M)`` (:func:`kdkit.attention.relation_log_probs`),
    averaged over heads and kept queries. ``student`` / ``teacher``: the value projection
    ``[B, L, H * d]`` of each layer. Hidden sizes may differ, head counts may not.
    """
    what = "minilm_value_relation"
    if validate_args:
        check_reduction(reduction, what)
        student_heads, teacher_heads = check_same_heads(student_heads, teacher_heads, what)
    rel_s = _relations(student, ("value",), student_heads, mask, f"{what} (student)")
    rel_t = _relations(teacher, ("value",), teacher_heads, mask, f"{what} (teacher)")
    keep = _map_keep(rel_s, mask)
    return _kl_maps(rel_s, rel_t, keep, reduction, num_items_in_batch, what)


def minilmv2_relations(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    relation_heads: int,
    relations: Sequence[str] = RELATIONS,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Multi-head self-attention relation distillation of Wang et al. 2021, "MiniLMv2:
    Multi-Head Self-Attention Relation Distillation for Compressing Pretrained Transformers".

    ``loss = sum_{x in relations} mean_l mean_{b,i} mean_r KL(R^t_{x,l,r,i} || R^s_{x,l,r,i})``
    (the paper's sum with weights 1) with ``R_{x,r} = softmax(X_r X_r^T / sqrt(d_r) + M)``: the
    projection ``X`` (query, key or value) split into ``relation_heads`` heads ``X_r``
    (:func:`kdkit.attention.relation_log_probs`), averaged over relation heads and kept queries.
    ``relation_heads`` need not be either model's head count, only divide both widths, so no
    projection is needed across hidden sizes and head counts. ``student`` / ``teacher``: per
    layer one projection ``[B, L, width]`` per name in ``relations``, in that order.
    """
    what = "minilmv2_relations"
    if validate_args:
        check_reduction(reduction, what)
        relations = check_relations(relations)
        check_num_heads("relation_heads", relation_heads, what)
    rel_s = _relations(student, relations, relation_heads, mask, f"{what} (student)")
    rel_t = _relations(teacher, relations, relation_heads, mask, f"{what} (teacher)")
    keep = _map_keep(rel_s, mask)
    # The flat lists interleave the relations of each layer: relation x is every len(relations)-th.
    n = len(relations)
    kls = [
        _kl_maps(rel_s[k::n], rel_t[k::n], keep, reduction, num_items_in_batch, what)
        for k in range(n)
    ]
    return torch.stack(kls).sum(dim=0)


def check_cls_index(cls_index: int) -> int:
    """Return the ``[CLS]`` position ``cls_index``, or raise: it must be an int."""
    if isinstance(cls_index, bool) or not isinstance(cls_index, int):
        raise TypeError(
            f"cls_index must be an int token position, got {cls_index!r}; BERT's [CLS] is 0, "
            "-1 takes the last token (e.g. a causal model's summary token)"
        )
    return cls_index


def patient_kd(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    cls_index: int = 0,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Normalized [CLS] hidden-state loss of Sun et al. 2019, "Patient Knowledge Distillation
    for BERT Model Compression".

    ``loss = mean_l mean_b || h^s_l / ||h^s_l|| - h^t_l / ||h^t_l|| ||_2^2`` on the hidden state
    ``h`` of the ``[CLS]`` token (position ``cls_index`` of ``[B, L, D]`` states; ``[B, D]``
    states are taken as they are). The paper sums over samples and layers; the mean keeps the
    weight independent of batch size and layer count. Student and teacher dims must match.
    """
    what = "patient_kd"
    if validate_args:
        check_reduction(reduction, what)
        cls_index = check_cls_index(cls_index)
    _check_layers(student, teacher, what)
    per_layer = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        for side, x in (("student", s), ("teacher", t)):
            if x.dim() not in (2, 3):
                raise ValueError(
                    f"{what}: {side} hidden state {i} has shape {tuple(x.shape)}; expected token "
                    "states [B, L, D] or [CLS] states [B, D]"
                )
            if x.dim() == 3 and not -x.shape[1] <= cls_index < x.shape[1]:
                raise ValueError(
                    f"{what}: cls_index={cls_index} is outside the {x.shape[1]} positions of the "
                    f"{side} hidden state {i} (shape {tuple(x.shape)}); BERT's [CLS] is 0"
                )
        s = _upcast(s[:, cls_index] if s.dim() == 3 else s)
        t = _upcast(t[:, cls_index] if t.dim() == 3 else t)
        _check_same_shape(s, t, i, what)
        per_layer.append((F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(dim=-1))
    return _layer_mean(per_layer, None, reduction, num_items_in_batch, what)


# --------------------------------------------------------------------------------------------
# sparse teacher targets: top-k log-probabilities + tail mass (a token cache's stored form)
# --------------------------------------------------------------------------------------------


def topk_at_temperature(
    values: Tensor,
    log_tail: Tensor,
    vocab_size: int,
    temperature: float,
    *,
    validate_args: bool = True,
) -> tuple[Tensor, Tensor]:
    """Re-temperature a top-k distribution stored at ``T = 1``: ``(values_T, log_tail_T)``.

    ``values`` are the teacher's log-probabilities ``log p_i = z_i - log Z`` at its k kept
    classes, ``log_tail = log m`` the log of the mass of the other ``V - k``. Then
    ``values / T = z_i / T - log Z / T``: the kept logits are known up to one constant per
    token, so the *ratios* of ``softmax(z / T)`` among the kept classes are exact at any T.
    The normaliser needs ``R_T = sum_{j not kept} p_j^(1/T)``, which the stored form does not
    have; it is estimated by spreading ``m`` evenly over the ``V - k`` other classes:
    ``R_T ~ (V - k) * (m / (V - k))^(1/T)``. So

    ``log p_i^T = values_i / T - log(sum_kept exp(values / T) + R_T)`` and
    ``log_tail_T = log R_T - (the same log-normaliser)``.

    Exact: everything at ``T = 1`` (returned unchanged), and every T when ``k = V``. Otherwise
    approximate, through ``R_T`` only: for ``T > 1`` the even spread is the largest ``R_T``
    given ``m`` (``x^(1/T)`` is concave), so the kept probabilities are slightly
    under-estimated and the tail over-estimated; for ``T < 1`` the reverse.
    """
    if validate_args:
        temperature = check_temperature(temperature)
    if temperature == 1.0:
        return values, log_tail
    values = _upcast(values) / temperature
    k = values.shape[-1]
    if k == vocab_size:
        norm = values.logsumexp(dim=-1, keepdim=True)
        return values - norm, torch.full_like(values[..., 0], float("-inf"))
    spread = math.log(vocab_size - k)
    log_rest = spread + (_upcast(log_tail) - spread) / temperature
    norm = torch.cat([values, log_rest.unsqueeze(-1)], dim=-1).logsumexp(dim=-1)
    return values - norm.unsqueeze(-1), log_rest - norm


def _check_topk_target(student_logits: Tensor, teacher: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``(values [..., k], indices [..., k], log_tail [...])`` checked against the student."""
    if not isinstance(teacher, Sequence) or len(teacher) < 3:
        raise TypeError(
            "sparse_kl_div: the teacher must be (values, indices, log_tail) (e.g. a "
            f"kdkit.cache.TopKTokens), got {type(teacher).__name__}"
        )
    values, indices, log_tail = teacher[0], teacher[1], teacher[2]
    rows, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if (
        values.shape != indices.shape
        or tuple(values.shape[:-1]) != rows
        or tuple(log_tail.shape) != rows
    ):
        raise ValueError(
            f"sparse_kl_div: student logits {tuple(student_logits.shape)} need teacher values "
            f"and indices [*{list(rows)}, k] and log_tail {list(rows)}; got values "
            f"{tuple(values.shape)}, indices {tuple(indices.shape)}, log_tail "
            f"{tuple(log_tail.shape)} (read the cache with the batch's indices, padded to the "
            "batch's length)"
        )
    if values.shape[-1] > vocab:
        raise ValueError(
            f"sparse_kl_div: the teacher keeps k={values.shape[-1]} classes but the student has "
            f"V={vocab}; the vocabularies differ"
        )
    return values, indices, log_tail


def sparse_kl_div(
    student_logits: Tensor,
    teacher_topk: Sequence[Tensor],
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Forward KL against a sparse teacher: its top-k log-probabilities and tail mass, as stored
    offline by DistillKit (arcee-ai, sparse top-k logit distillation) and
    :class:`kdkit.cache.TokenCache`; Hinton, Vinyals & Dean 2015 for the ``T^2`` soft loss.

    ``teacher_topk = (values, indices, log_tail)``: the teacher's log-probabilities ``log p_i``
    at classes ``i in K`` (``[..., k]``) and ``log m_t``, the log of its mass outside K. With
    ``q = softmax(z_s / T)`` and ``m_s = sum_{j not in K} q_j``:

    ``loss = T^2 * mean_n [ sum_{i in K} p_i (log p_i - log q_i) + m_t (log m_t - log m_s) ]``,

    the exact KL between teacher and student with the classes outside K merged into one
    bucket (a lower bound of the full KL; equal to it when ``k = V``, where ``m_t = 0``). The
    teacher is never densified; the student's ``log m_s`` is the logsumexp of its log-probs
    outside K. At ``T != 1`` the teacher side comes from :func:`topk_at_temperature` (kept
    ratios exact, normaliser approximate; see there). ``mask`` (bool ``[B, L]``, True = keep)
    selects the tokens averaged over; dropped rows are zeroed first.
    """
    if validate_args:
        temperature = check_temperature(temperature)
        check_reduction(reduction, "sparse_kl_div")
    values, indices, log_tail = _check_topk_target(student_logits, teacher_topk)
    keep = _keep(mask, student_logits)
    vocab, k = student_logits.shape[-1], values.shape[-1]
    kept_log_tail = _drop(_upcast(log_tail).unsqueeze(-1), keep)[..., 0]
    log_p, log_m_t = topk_at_temperature(
        _drop(_upcast(values), keep), kept_log_tail, vocab, temperature, validate_args=False
    )
    index = _drop(indices, keep).long()
    log_q = log_softmax(_drop(student_logits, keep), temperature)
    log_q_kept = log_q.gather(-1, index)
    if k < vocab:
        log_m_s = log_q.scatter(-1, index, float("-inf")).logsumexp(dim=-1)
        log_p = torch.cat([log_p, log_m_t.unsqueeze(-1)], dim=-1)
        log_q_kept = torch.cat([log_q_kept, log_m_s.unsqueeze(-1)], dim=-1)
    rows = temperature**2 * _kl_rows(log_p, log_q_kept)
    return reduce(rows, keep, reduction, num_items_in_batch)


# --------------------------------------------------------------------------------------------
# token divergences of DistiLLM, and the memo switch of the chunked losses
# --------------------------------------------------------------------------------------------


@contextmanager
def unshared_log_softmax() -> Iterator[None]:
    """Within this block :func:`log_softmax` memoises nothing, even inside
    :func:`shared_log_softmax`.

    :mod:`kdkit.chunked` computes token losses a chunk of rows at a time; memoising each chunk's
    log-softmax would keep the whole ``[N, V]`` tensor alive after all, so it opens this block.
    """
    token = _SHARED.set(None)
    try:
        yield
    finally:
        _SHARED.reset(token)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """``log(weight * p + (1 - weight) * q)`` for ``0 < weight < 1``, from log-probabilities."""
    # Floored like _kl_rows: logsumexp of two -inf (a class masked in both) has NaN gradients.
    # Each side at its own dtype's minimum (a float32 side cannot hold float64's); stack promotes.
    mixed = torch.stack([_floor(log_p) + math.log(weight), _floor(log_q) + math.log1p(-weight)])
    return torch.logsumexp(mixed, dim=0)


def _skew(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float,
    temperature: float,
    mask: Tensor | None,
    reduction: str,
    num_items_in_batch: Count,
    reverse: bool,
) -> Tensor:
    """``T^2 * KL(p || alpha p + (1 - alpha) q)``: ``p = p_t, q = p_s``, or reversed."""
    if alpha == 0.0:
        return (reverse_kl_div if reverse else kl_div)(
            student_logits,
            teacher_logits,
            temperature,
            mask,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
            validate_args=False,
        )
    check_logits(student_logits, teacher_logits)
    keep = _keep(mask, student_logits)
    log_p_s, log_p_t = _soft_log_probs(student_logits, teacher_logits, temperature, keep)
    log_p, log_q = (log_p_s, log_p_t) if reverse else (log_p_t, log_p_s)
    rows = temperature**2 * _kl_rows(log_p, _log_mixture(log_p, log_q, alpha))
    return reduce(rows, keep, reduction, num_items_in_batch)


def skew_kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Skew KL divergence of Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models".

    ``SKL_alpha = KL(p_t || alpha p_t + (1 - alpha) p_s)`` (DistiLLM's ``skewed_forward_kl``,
    default ``alpha = 0.1``), ``loss = T^2 * mean_n SKL_alpha``, ``p = softmax(z / T)``. The
    mixture keeps the value and the gradients bounded where the student gives a teacher class
    almost no mass; ``alpha = 0`` is exactly :func:`kl_div`. DistiLLM's reference code returns the
    cross-entropy ``-sum p_t log m`` (this value plus the teacher's entropy: same gradient).
    """
    if validate_args:
        alpha = check_skew_alpha(alpha)
        temperature = check_temperature(temperature)
        check_reduction(reduction, "skew_kl_div")
    return _skew(
        student_logits,
        teacher_logits,
        alpha,
        temperature,
        mask,
        reduction,
        num_items_in_batch,
        reverse=False,
    )


def skew_reverse_kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Skew reverse KL divergence of Ko et al. 2024, "DistiLLM".

    ``SRKL_alpha = KL(p_s || alpha p_s + (1 - alpha) p_t)`` (DistiLLM's ``skewed_reverse_kl``,
    default ``alpha = 0.1``), ``loss = T^2 * mean_n SRKL_alpha``. For ``alpha > 0`` the mixture
    covers every class of ``p_s``, so classes the teacher masks (``-inf``) give a finite value
    without restricting the student; ``alpha = 0`` is exactly :func:`reverse_kl_div`.
    """
    if validate_args:
        alpha = check_skew_alpha(alpha)
        temperature = check_temperature(temperature)
        check_reduction(reduction, "skew_reverse_kl_div")
    return _skew(
        student_logits,
        teacher_logits,
        alpha,
        temperature,
        mask,
        reduction,
        num_items_in_batch,
        reverse=True,
    )


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Count = None,
    validate_args: bool = True,
) -> Tensor:
    """Total variation distance, as in DistiLLM's ``tv_distance`` (Ko et al. 2024) and the
    f-divergence distillation of Wen et al. 2023, "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation".

    ``loss = mean_n 0.5 * sum_c |p_t,c - p_s,c|``, ``p = softmax(z / T)``: a distance bounded by
    1. It is not multiplied by ``T^2``: that factor restores the ``1 / T^2`` gradient scale of the
    KL family, while TVD's gradient shrinks like ``1 / T``. Masked classes have ``p = 0``.
    """
    if validate_args:
        temperature = check_temperature(temperature)
        check_reduction(reduction, "tvd")
    check_logits(student_logits, teacher_logits)
    keep = _keep(mask, student_logits)
    log_p_s, log_p_t = _soft_log_probs(student_logits, teacher_logits, temperature, keep)
    rows = 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(dim=-1)
    return reduce(rows, keep, reduction, num_items_in_batch)
