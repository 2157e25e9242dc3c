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
from kdkit.contract import check_reduction, reduce

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
    "mse_hidden_states",
    "mse_logits",
    "pkt",
    "reverse_kl_div",
    "rkd",
    "skew_kl_div",
    "skew_reverse_kl_div",
    "soft_cross_entropy",
    "tvd",
    "unshared_log_softmax",
]

Count = int | Tensor | None


# --------------------------------------------------------------------------------------------
# shared private helpers
# --------------------------------------------------------------------------------------------


def _upcast(x: Tensor) -> Tensor:
    # log_softmax in fp16/bf16 loses the small probabilities that carry the "dark knowledge".
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


_SHARED: ContextVar[dict[tuple[int, int, float, bool], tuple[Tensor, Tensor]] | None] = ContextVar(
    "kdkit_shared_log_softmax", default=None
)


@contextmanager
def shared_log_softmax() -> Iterator[None]:
    """Within this block, ``log_softmax(z, T)`` of the same tensor and T is computed once.

    The Distiller opens it around its terms, so KD, Hinton and CE terms on the same logits share
    one softmax per temperature. Entries are keyed by the tensor's identity and version counter
    (an in-place change invalidates them) and hold the tensor, so its id cannot be reused.
    """
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(z / T)`` over the last dim, in float32 for half-precision logits."""
    memo = _SHARED.get()
    key = (id(logits), logits._version, float(temperature), torch.is_grad_enabled())
    if memo is not None and key in memo and memo[key][0] is logits:
        return memo[key][1]
    scaled = _upcast(logits) if temperature == 1.0 else _upcast(logits) / temperature
    out = F.log_softmax(scaled, dim=-1)
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


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` over the last dim, with ``0 log 0 = 0``."""
    # One fused kernel, exp(t) * (t - input). Flooring -inf log-probs (masked classes) at the
    # dtype's minimum keeps 0 log 0 = 0 and the gradients finite.
    floor = torch.finfo(log_p.dtype).min
    kl = F.kl_div(log_q.clamp(min=floor), log_p.clamp(min=floor), reduction="none", log_target=True)
    return kl.sum(dim=-1)


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
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _layer_mean(
    per_layer: list[Tensor],
    keep: Tensor | None,
    reduction: str,
    num_items_in_batch: Count,
    what: str,
) -> Tensor:
    """The mean over layers of the reduced per-layer values (of the values, for ``"none"``)."""
    if reduction != "none":
        reduced = [reduce(v, keep, reduction, num_items_in_batch) for v in per_layer]
        return reduced[0] if len(reduced) == 1 else torch.stack(reduced).mean()
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
    log_p_s, log_p_t = _soft_log_probs(student_logits, teacher_logits, temperature, keep)
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
        # Floored like _kl_rows: logsumexp of two -inf (a class masked in both) has NaN grads.
        floor = torch.finfo(log_p_s.dtype).min
        log_p_t, log_p_s = log_p_t.clamp(min=floor), log_p_s.clamp(min=floor)
        log_m = torch.logsumexp(
            torch.stack([log_p_t + math.log(beta), log_p_s + math.log1p(-beta)]), dim=0
        )
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


def _hard_cross_entropy_rows(logits: Tensor, target: Tensor, soft_target: bool) -> Tensor:
    """Per-sample ``-log softmax(z)[y]``, or ``-Σ y log softmax(z)`` for probability targets
    (negative class indices give the value at class 0: the caller drops them)."""
    log_q = log_softmax(logits, 1.0)
    if soft_target:
        return -(target.to(log_q.dtype) * log_q).sum(dim=-1)
    safe_target = torch.where(target >= 0, target, torch.zeros_like(target))
    return -log_q.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)


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
    hard = _hard_cross_entropy_rows(s, target, soft_target)
    log_p_s, log_p_t = log_softmax(s, temperature), log_softmax(t, temperature)
    soft = temperature**2 * _cross_entropy_rows(log_p_t, log_p_s)
    if reduction == "mean":
        return alpha * reduce(hard, labeled, "mean", num_items_in_batch) + beta * reduce(
            soft, keep, "mean", num_items_in_batch
        )
    if labeled is not None:
        hard = torch.where(labeled, hard, torch.zeros_like(hard))
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
    keep = _keep(mask, logits)
    soft_target = _is_soft_target(target, logits)
    if not soft_target:
        keep = _both(target >= 0, keep)
    hard = _hard_cross_entropy_rows(
        _drop(logits, _padding(keep, logits, mask)), target, soft_target
    )
    return reduce(hard, keep, reduction, num_items_in_batch)


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
        squared = F.mse_loss(s, t, reduction="none")
        per_layer.append(squared.mean(dim=-1) if keep is not None else _per_sample(squared))
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
        distance = 1.0 - F.cosine_similarity(s, t, dim=dim)
        per_layer.append(distance if keep is not None else _per_sample(distance))
    return _layer_mean(per_layer, keep, reduction, num_items_in_batch, "cosine_hidden_states")


def _attention_map(feature: Tensor, p: float) -> Tensor:
    return F.normalize(_upcast(feature).abs().pow(p).mean(dim=1).flatten(1), dim=1)


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
        per_layer.append((_attention_map(s, p) - _attention_map(t, p)).pow(2).mean(dim=1))
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
    floor = torch.finfo(log_p.dtype).min
    mixed = torch.stack(
        [log_p.clamp(min=floor) + math.log(weight), log_q.clamp(min=floor) + math.log1p(-weight)]
    )
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
