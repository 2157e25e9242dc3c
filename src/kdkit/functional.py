"""Distillation losses as pure functions: tensors in, scalar out.

The math of every kdkit loss lives here once; :mod:`kdkit.losses` only wraps it in modules.

Conventions shared by the logit losses:

* ``student_logits`` and ``teacher_logits`` have the same shape, ``[B, C]`` or token logits
  ``[B, L, C]``, with classes on the last dimension.
* ``p_t = softmax(z_t / T)`` and ``p_s = softmax(z_s / T)``; the soft terms are multiplied by
  ``T**2`` (Hinton et al. 2015) so that their gradients keep their scale as ``T`` changes.
* Divergences are summed over classes and averaged over samples (``batchmean``), never over
  elements: an element mean would divide the loss by the class count. For token logits the
  average runs over the tokens kept by ``mask`` (bool ``[B, L]``, True = keep).
* Half-precision inputs are upcast to float32 before ``log_softmax``; the loss is float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_map",
    "attention_transfer",
    "check_temperature",
    "cosine_hidden_states",
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
    "soft_cross_entropy",
]


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def check_temperature(value: float) -> float:
    """Return ``value`` as a float, or raise the standard error for a bad temperature."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value}; it weights a loss term, "
            f"so a negative weight would reward the student for moving away from the target"
        )
    return value


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
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


def _check_mask(mask: Tensor, token_shape: torch.Size) -> Tensor:
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the logits' token shape "
            f"{tuple(token_shape)}; pass a bool mask shaped like the logits without the class "
            "dimension (True = keep the token)"
        )
    if mask.dtype == torch.bool:
        return mask
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            f"mask holds values other than 0/1 (dtype {mask.dtype}); pass a bool mask (True = "
            "keep the token). Labels go in target=, with ignore_index set."
        )
    return mask != 0


def _check_hard_target(target: Tensor, logits: Tensor) -> None:
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)}; expected class indices shaped {tuple(logits.shape[:-1])}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices, got dtype {target.dtype}; "
            "convert with target.long()"
        )


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


def _softened_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, float]:
    """Checked ``(log p_s, log p_t, T)`` with ``p = softmax(z / T)`` over the last dim.

    Masked-out tokens are zeroed first: their loss is dropped anyway, and NaN/Inf there (fp16
    overflow in padding) would otherwise reach the gradients through the backward pass.
    """
    temperature = check_temperature(temperature)
    _check_logits(student_logits, teacher_logits)
    if mask is not None:
        drop = ~_check_mask(mask.to(student_logits.device), student_logits.shape[:-1]).unsqueeze(-1)
        student_logits = student_logits.masked_fill(drop, 0.0)
        teacher_logits = teacher_logits.masked_fill(drop, 0.0)
    log_p_s = log_softmax(student_logits, temperature)
    log_p_t = log_softmax(teacher_logits, temperature)
    return log_p_s, log_p_t, temperature


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


def _masked_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-sample / per-token values over the kept entries (0 when none is kept)."""
    if mask is None:
        return per_token.mean()
    keep = _check_mask(mask.to(per_token.device), per_token.shape)
    total = torch.where(keep, per_token, torch.zeros_like(per_token)).sum()
    return total / keep.sum().clamp(min=1)


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


# --------------------------------------------------------------------------------------------
# logit losses
# --------------------------------------------------------------------------------------------


def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft-target KL divergence of Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network".

    ``loss = T^2 * mean_n KL(p_t || p_s) = T^2 * mean_n sum_c p_t,c (log p_t,c - log p_s,c)``,
    ``p = softmax(z / T)``, mean over samples (``batchmean``) or over the tokens kept by ``mask``.

    The gradient is ``dloss/dz_s = T (p_s - p_t) / N`` for ``N`` samples.
    """
    log_p_s, log_p_t, temperature = _softened_log_probs(
        student_logits, teacher_logits, temperature, mask
    )
    return temperature**2 * _masked_mean(_kl_rows(log_p_t, log_p_s), mask)


def reverse_kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Reverse (mode-seeking) KL, as used for LLM distillation by Gu et al. 2024, "MiniLLM:
    Knowledge Distillation of Large Language Models".

    ``loss = T^2 * mean_n KL(p_s || p_t) = T^2 * mean_n sum_c p_s,c (log p_s,c - log p_t,c)``.
    """
    log_p_s, log_p_t, temperature = _softened_log_probs(
        student_logits, teacher_logits, temperature, mask
    )
    return temperature**2 * _masked_mean(_kl_rows(log_p_s, log_p_t), mask)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
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
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"beta must be a number in [0, 1], got {beta!r}; 0 = forward KL(teacher || student), "
            "1 = reverse KL(student || teacher), in between = generalized JSD"
        )
    log_p_s, log_p_t, temperature = _softened_log_probs(
        student_logits, teacher_logits, temperature, mask
    )
    if beta == 0.0:
        rows = _kl_rows(log_p_t, log_p_s)
    elif beta == 1.0:
        rows = _kl_rows(log_p_s, log_p_t)
    else:
        # Floored like _kl_rows: logsumexp of two -inf (a class masked in both) has NaN grads.
        floor = torch.finfo(log_p_s.dtype).min
        log_p_t, log_p_s = log_p_t.clamp(min=floor), log_p_s.clamp(min=floor)
        log_m = torch.logsumexp(
            torch.stack([log_p_t + math.log(beta), log_p_s + math.log1p(-beta)]), dim=0
        )
        rows = beta * _kl_rows(log_p_t, log_m) + (1.0 - beta) * _kl_rows(log_p_s, log_m)
    return temperature**2 * _masked_mean(rows, mask)


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft-target cross-entropy of Hinton et al. 2015.

    ``loss = T^2 * mean_n H(p_t, p_s) = -T^2 * mean_n sum_c p_t,c log p_s,c``. It equals
    :func:`kl_div` plus ``T^2`` times the teacher's entropy, so it has the same gradient in the
    student but is not 0 when student and teacher agree.
    """
    log_p_s, log_p_t, temperature = _softened_log_probs(
        student_logits, teacher_logits, temperature, mask
    )
    return temperature**2 * _masked_mean(_cross_entropy_rows(log_p_t, log_p_s), mask)


def hinton_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 0.1,
    beta: float = 0.9,
    temperature: float = 4.0,
) -> Tensor:
    """Combined distillation loss of Hinton et al. 2015 (the seed lecture's formulation).

    ``loss = alpha * H(y, softmax(z_s)) + beta * T^2 * H(softmax(z_t / T), softmax(z_s / T))``:
    the hard "student loss" at ``T = 1`` plus the soft cross-entropy with the teacher.

    ``target`` holds class indices shaped like the logits without the class dim, or class
    probabilities shaped like the logits (e.g. from mixup). Negative indices mark samples without
    a label (kdkit's unlabeled transfer sets use -1): they get the soft term only, the hard term
    averages over the labelled ones. -100 (``F.cross_entropy``'s ignore_index, padding tokens)
    drops the sample / token from both terms.
    """
    alpha = _check_weight("alpha", alpha)
    beta = _check_weight("beta", beta)
    log_p_s, log_p_t, temperature = _softened_log_probs(student_logits, teacher_logits, temperature)
    hard, labeled = _hard_cross_entropy_rows(student_logits, target)
    mask = None if labeled is None else target != -100
    soft = _cross_entropy_rows(log_p_t, log_p_s)
    return alpha * _masked_mean(hard, labeled) + beta * temperature**2 * _masked_mean(soft, mask)


def _hard_cross_entropy_rows(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-sample ``-log softmax(z)[y]`` (or ``-Σ y log softmax(z)`` for probability targets),
    with the mask of labelled samples (None for probability targets)."""
    log_q = log_softmax(logits, 1.0)
    if target.dtype.is_floating_point and target.shape == logits.shape:
        return -(target.to(log_q.dtype) * log_q).sum(dim=-1), None
    _check_hard_target(target, logits)
    labeled = target >= 0
    safe_target = torch.where(labeled, target, torch.zeros_like(target))
    return -log_q.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1), labeled


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy with the ground truth over the labelled samples only.

    ``loss = mean_{i: y_i >= 0} -log softmax(z_i)[y_i]``; negative labels mark unlabeled samples
    of a transfer set (kdkit uses -1) and padding (-100). With no labelled sample the loss is 0
    (not NaN), so a batch drawn only from the unlabeled part trains on the soft terms alone.
    ``target`` may also hold class probabilities shaped like ``logits`` (mixup).
    """
    hard, labeled = _hard_cross_entropy_rows(logits, target)
    return _masked_mean(hard, labeled)


def mse_logits(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Logit matching, the high-temperature limit of Hinton et al. 2015 (Ba & Caruana 2014).

    ``loss = mean((z_s - z_t)^2)`` over all elements of the kept samples / tokens.

    Its gradient is ``2 (z_s - z_t) / (B * C)``. For zero-mean logits the gradient of
    ``T^2 * KL(p_t || p_s)`` tends to ``(z_s - z_t) / (B * C)`` as ``T -> inf``, so this loss
    is that limit with twice the gradient.
    """
    _check_logits(student_logits, teacher_logits)
    diff = _upcast(student_logits) - _upcast(teacher_logits)
    if mask is not None:  # zeroed, so NaN/Inf in dropped tokens cannot reach the gradients
        keep = _check_mask(mask.to(diff.device), diff.shape[:-1])
        diff = diff.masked_fill(~keep.unsqueeze(-1), 0.0)
    return _masked_mean(diff.pow(2).mean(dim=-1), mask)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled Knowledge Distillation of Zhao et al., CVPR 2022 (``dkd_loss`` of mdistiller).

    With ``p = softmax(z / T)`` and ``g`` the target class:

    * TCKD = ``KL(b_t || b_s)``, ``b = [p_g, 1 - p_g]`` (target vs. all non-target classes);
    * NCKD = ``KL(p~_t || p~_s)``, ``p~ = softmax over the non-target classes only``;

    ``loss = T^2 * mean_n (alpha * TCKD + beta * NCKD)``. mdistiller removes the target class
    from NCKD by subtracting 1000 from its logit; kdkit drops it exactly (same value in float32
    unless logits / T span more than ~100). Samples with a negative label (unlabeled, or
    ignore_index -100) have no target class and are left out of the mean.
    """
    alpha = _check_weight("alpha", alpha)
    beta = _check_weight("beta", beta)
    log_p_s, log_p_t, temperature = _softened_log_probs(student_logits, teacher_logits, temperature)
    _check_hard_target(target, student_logits)
    num_classes = student_logits.shape[-1]
    if target.numel() and int(target.max()) >= num_classes:
        raise ValueError(
            f"dkd: target holds class index {int(target.max())} but the logits have "
            f"{num_classes} classes (valid: 0..{num_classes - 1}, negative = unlabeled)"
        )
    labeled = target >= 0
    gt = F.one_hot(torch.where(labeled, target, 0).long(), num_classes).bool()
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
    return temperature**2 * _masked_mean(alpha * tckd + beta * nckd, labeled)


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
) -> Tensor:
    """DIST of Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher".

    With ``Y = softmax(z / T)`` as ``[N, C]`` matrices and ``rho`` the Pearson correlation:
    ``inter = 1 - mean_n rho(Y_s[n, :], Y_t[n, :])`` (class ranking of each sample),
    ``intra = 1 - mean_c rho(Y_s[:, c], Y_t[:, c])`` (each class across the batch),
    ``loss = T^2 * (beta * inter + gamma * intra)``. Token logits are flattened to ``[N, C]``.
    """
    beta = _check_weight("beta", beta)
    gamma = _check_weight("gamma", gamma)
    log_p_s, log_p_t, temperature = _softened_log_probs(student_logits, teacher_logits, temperature)
    num_classes = log_p_s.shape[-1]
    y_s = log_p_s.exp().reshape(-1, num_classes)
    y_t = log_p_t.exp().reshape(-1, num_classes)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


# --------------------------------------------------------------------------------------------
# feature losses
# --------------------------------------------------------------------------------------------


def mse_hidden_states(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    normalize: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """Hint / hidden-state MSE (Romero et al. 2015, "FitNets"; Jiao et al. 2020, "TinyBERT").

    ``loss = mean_l mean((f(h_s,l) - f(h_t,l))^2)`` where ``f`` is the identity, or, with
    ``normalize=True``, L2 normalisation over the feature dim (last dim of ``[B, D]`` /
    ``[B, L, D]``, channel dim of ``[B, C, H, W]``). Shapes must match per layer. For token
    states ``[B, L, D]`` a bool ``mask`` ``[B, L]`` averages over the kept tokens only.
    """
    _check_layers(student, teacher, "mse_hidden_states")
    losses = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        dim = _feature_dim(s, f"mse_hidden_states: student hidden state {i}")
        _check_same_shape(s, t, i, "mse_hidden_states")
        s, t = _upcast(s), _upcast(t)
        if normalize:
            s, t = F.normalize(s, dim=dim), F.normalize(t, dim=dim)
        if mask is None:
            losses.append(F.mse_loss(s, t))
        else:
            diff = _drop_masked_tokens(s - t, mask, f"mse_hidden_states layer {i}")
            losses.append(_masked_mean(diff.pow(2).mean(dim=-1), mask))
    return torch.stack(losses).mean()


def _drop_masked_tokens(per_token_vectors: Tensor, mask: Tensor, where: str) -> Tensor:
    """Zero the vectors of dropped tokens in ``[B, L, D]`` (so NaN/Inf there has no gradient)."""
    if per_token_vectors.dim() != 3:
        raise ValueError(
            f"{where}: a token mask needs token states [B, L, D], got shape "
            f"{tuple(per_token_vectors.shape)}; drop mask= for [B, D] or [B, C, H, W] features"
        )
    keep = _check_mask(mask.to(per_token_vectors.device), per_token_vectors.shape[:-1])
    return per_token_vectors.masked_fill(~keep.unsqueeze(-1), 0.0)


def cosine_hidden_states(
    student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None
) -> Tensor:
    """Cosine hidden-state loss (as in DistilBERT, Sanh et al. 2019).

    ``loss = mean_l mean(1 - cos(h_s,l, h_t,l))``, cosine over the feature dim (last dim of
    ``[B, D]`` / ``[B, L, D]``, channel dim of ``[B, C, H, W]``), mean over the other positions
    (over the tokens a bool ``mask`` ``[B, L]`` keeps, for token states).
    """
    _check_layers(student, teacher, "cosine_hidden_states")
    losses = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        dim = _feature_dim(s, f"cosine_hidden_states: student hidden state {i}")
        _check_same_shape(s, t, i, "cosine_hidden_states")
        s, t = _upcast(s), _upcast(t)
        if mask is not None:
            where = f"cosine_hidden_states layer {i}"
            s, t = _drop_masked_tokens(s, mask, where), _drop_masked_tokens(t, mask, where)
        losses.append(_masked_mean(1.0 - F.cosine_similarity(s, t, dim=dim), mask))
    return torch.stack(losses).mean()


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
    if isinstance(p, bool) or not isinstance(p, int | float) or p <= 0:
        raise ValueError(f"attention_map: p must be a number > 0, got {p!r}; the paper uses p=2")
    return F.normalize(_upcast(feature).abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer(
    student: Sequence[Tensor], teacher: Sequence[Tensor], p: float = 2
) -> Tensor:
    """Attention transfer loss of Zagoruyko & Komodakis, ICLR 2017.

    ``loss = mean_l mean((a(F_s,l) - a(F_t,l))^2)`` with ``a`` = :func:`attention_map`. Channel
    counts may differ; where spatial sizes differ, the larger map is adaptive-average-pooled to
    the smaller size first. (The paper weights this term by ``beta = 1000``; set that as the
    term's weight.) Invariant to rescaling either feature map.
    """
    _check_layers(student, teacher, "attention_transfer")
    losses = []
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
        losses.append((attention_map(s, p) - attention_map(t, p)).pow(2).mean())
    return torch.stack(losses).mean()


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
) -> Tensor:
    """Relational Knowledge Distillation of Park et al., CVPR 2019.

    Distance-wise: ``psi_D(i, j) = ||x_i - x_j|| / mu`` with ``mu`` the mean of the non-zero
    pairwise distances; angle-wise: ``psi_A(i, j, k) = <e_ij, e_kj>`` with
    ``e_ij = (x_i - x_j) / ||x_i - x_j||``. ``loss = distance_weight * smoothL1(psi_D^s, psi_D^t)
    + angle_weight * smoothL1(psi_A^s, psi_A^t)`` (element means). Embeddings are flattened to
    ``[B, D]``; student and teacher dims may differ.
    """
    distance_weight = _check_weight("distance_weight", distance_weight)
    angle_weight = _check_weight("angle_weight", angle_weight)
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
