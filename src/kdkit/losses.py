"""Distillation losses as ``nn.Module`` s: thin wrappers of :mod:`kdkit.functional`.

Every loss is a :class:`kdkit.contract.DistillationLoss`: it declares what it reads
(``needs_target``, ``reads_teacher``, ``takes_mask``, ``per_sample``, ``temperature``) and takes
``reduction`` (``"mean"``, ``"sum"``, ``"none"``). One ``forward`` per family:

* logit losses: ``loss(student, teacher, *, target=None, mask=None, num_items_in_batch=None)``;
  :class:`HintonLoss` and :class:`DKDLoss` need the labels and take them as the third positional
  argument too: ``loss(student, teacher, target, *, mask=None, num_items_in_batch=None)``;
* feature losses: ``loss(student, teacher, *, mask=None, num_items_in_batch=None)`` with a Tensor
  or a list/tuple of Tensors (one entry per layer pair);
* :class:`CrossEntropyLoss` reads no teacher: ``loss(logits, target, *, mask=None,
  num_items_in_batch=None)``.

A loss given a ``mask`` it does not take (``takes_mask = False``), or a ``num_items_in_batch``
while not per-sample, raises. Hyper-parameters are checked once, in ``__init__``. Learnable parts
(the mappings of :class:`MSEHiddenStatesLoss`, the regressor of :class:`FitNetsLoss`) sit on the
student side and are registered parameters, so optimizers and checkpoints see them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from torch import Tensor, nn

from kdkit import functional as KF
from kdkit._checks import (
    check_attention_p,
    check_jsd_beta,
    check_logits,
    check_mask,
    check_num_items,
    check_skew_alpha,
    check_temperature,
    check_weight,
)
from kdkit.attention import RELATIONS, check_num_heads, check_relations, check_same_heads
from kdkit.chunked import (
    ChunkSize,
    RowFunction,
    check_chunk_size,
    chunked_rows,
    fused_linear_rows,
)
from kdkit.contract import DistillationLoss

__all__ = [
    "AttentionLoss",
    "CosineHiddenStatesLoss",
    "CrossEntropyLoss",
    "DISTLoss",
    "DKDLoss",
    "FitNetsLoss",
    "FusedLinearJSDLoss",
    "GeneralizedJSDLoss",
    "HintonLoss",
    "KLDivLoss",
    "MSEHiddenStatesLoss",
    "MSELogitsLoss",
    "MiniLMAttentionLoss",
    "MiniLMValueRelationLoss",
    "MiniLMv2RelationLoss",
    "PKTLoss",
    "PatientKDLoss",
    "RKDLoss",
    "ReverseKLDivLoss",
    "TinyBERTAttentionLoss",
    "SparseKLDivLoss",
    "SkewKLDivLoss",
    "SkewReverseKLDivLoss",
    "TVDLoss",
]

HiddenStates = Tensor | Sequence[Tensor]
Count = int | Tensor | None


def _as_list(states: HiddenStates, who: str) -> list[Tensor]:
    if isinstance(states, Tensor):
        return [states]
    if isinstance(states, (list, tuple)) and all(isinstance(s, Tensor) for s in states):
        return list(states)
    raise TypeError(
        f"{who} hidden states must be a Tensor or a list/tuple of Tensors, got "
        f"{type(states).__name__}; select the tensors from the model output first "
        "(kdkit.capture.select_tensor)"
    )


def _options(loss: DistillationLoss, num_items_in_batch: Count) -> dict[str, object]:
    """The functional call's keywords: the module's reduction; its arguments checked already."""
    return {
        "reduction": loss.reduction,
        "num_items_in_batch": num_items_in_batch,
        "validate_args": False,
    }


def _require_target(loss: nn.Module, target: Tensor | None, call: str) -> Tensor:
    if target is None:
        raise ValueError(
            f"{type(loss).__name__} needs the ground-truth target: call loss({call}, target)"
        )
    return target


def _label_mask(
    loss: nn.Module,
    ignore_index: int | None,
    mask: Tensor | None,
    target: Tensor | None,
    tokens: tuple[int, ...],
) -> Tensor | None:
    """``mask`` and ``target != ignore_index`` combined; labels without ``ignore_index``, or not
    one per token (``tokens``: the logits' or hidden states' shape without the last dim), raise."""
    if target is None:
        return mask
    if target.shape != tokens:
        raise ValueError(
            f"{type(loss).__name__}: target (the labels) has shape {tuple(target.shape)} but "
            f"the tokens are {tuple(tokens)}; pass one label per token, shaped like the logits "
            "without the class dimension (a causal LM's labels shifted once, as "
            "kdkit.data.text yields them)."
        )
    if ignore_index is None:
        raise ValueError(
            f"{type(loss).__name__} got target but ignore_index is None, so the labels "
            "would be ignored; set ignore_index (e.g. -100 for padding) or drop target."
        )
    keep = target != ignore_index
    return keep if mask is None else keep & check_mask(mask, keep.shape, keep.device)


def _row_function(
    formula: Callable[..., Tensor], hyper_parameters: tuple[float, ...]
) -> RowFunction:
    """One chunk's per-token values of ``formula`` (0 at dropped tokens), for kdkit.chunked."""

    def rows(student: Tensor, teacher: Tensor, keep: Tensor | None) -> Tensor:
        return formula(
            student, teacher, *hyper_parameters, keep, reduction="none", validate_args=False
        )

    return rows


# --------------------------------------------------------------------------------------------
# logit losses
# --------------------------------------------------------------------------------------------


class _TokenLogitLoss(DistillationLoss):
    """A loss on ``[B, C]`` or token logits ``[B, L, C]`` that reads no labels of its own.

    ``mask`` (bool, True = keep) and, with ``ignore_index`` set, ``target != ignore_index``
    select the tokens averaged over. Both are keyword-only, so labels can never be taken for a
    mask. ``formula(student, teacher, *hyper_parameters, mask, ...)`` is the functional form.

    With ``chunk_size`` set, token logits ``[B, L, C]`` (of a teacher that needs no gradient) go
    through :func:`kdkit.chunked.chunked_rows`: ``chunk_size`` tokens at a time, keeping no
    ``[B, L, C]`` intermediate beyond the student logits' gradient, same values.
    """

    takes_mask = True
    formula: ClassVar[staticmethod]

    def __init__(
        self,
        ignore_index: int | None = None,
        *,
        reduction: str = "mean",
        chunk_size: ChunkSize | None = None,
    ) -> None:
        super().__init__(reduction)
        self.ignore_index = ignore_index
        self.chunk_size = check_chunk_size(chunk_size, type(self).__name__)

    def hyper_parameters(self) -> tuple[float, ...]:
        return ()

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        target: Tensor | None = None,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        mask = _label_mask(self, self.ignore_index, mask, target, student.shape[:-1])
        if self.chunk_size is not None and student.dim() == 3 and not teacher.requires_grad:
            check_logits(student, teacher)
            keep = None if mask is None else check_mask(mask, student.shape[:-1], student.device)
            rows_of = _row_function(type(self).formula, self.hyper_parameters())
            rows = chunked_rows(rows_of, student, teacher, keep, self.chunk_size)
            return self.reduce(rows, keep, num_items_in_batch)
        return type(self).formula(
            student,
            teacher,
            *self.hyper_parameters(),
            mask,
            **_options(self, num_items_in_batch),
        )


class _KLFamilyLoss(_TokenLogitLoss):
    def __init__(
        self,
        temperature: float = 1.0,
        ignore_index: int | None = None,
        *,
        reduction: str = "mean",
        chunk_size: ChunkSize | None = "auto",
    ) -> None:
        super().__init__(ignore_index, reduction=reduction, chunk_size=chunk_size)
        self.temperature = check_temperature(temperature)

    def hyper_parameters(self) -> tuple[float, ...]:
        return (self.temperature,)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}"
        )


class KLDivLoss(_KLFamilyLoss):
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, batchmean (Hinton, Vinyals & Dean
    2015, "Distilling the Knowledge in a Neural Network").

    Accepts ``[B, C]`` and token logits ``[B, L, C]``; ``mask`` (bool, True = keep) or, with
    ``ignore_index`` set, ``target != ignore_index`` selects the tokens averaged over.
    See :func:`kdkit.functional.kl_div`.
    """

    formula = staticmethod(KF.kl_div)


class ReverseKLDivLoss(_KLFamilyLoss):
    """``T^2 * KL(softmax(z_s / T) || softmax(z_t / T))``, batchmean (Gu et al. 2024, "MiniLLM:
    Knowledge Distillation of Large Language Models").

    Same inputs as :class:`KLDivLoss`. Classes the teacher masks (``-inf``) are masked in the
    student too (its softmax is renormalised over the teacher's support), which keeps the value
    and gradients finite; see :func:`kdkit.functional.reverse_kl_div`.
    """

    formula = staticmethod(KF.reverse_kl_div)


class GeneralizedJSDLoss(_TokenLogitLoss):
    """Generalized JSD of GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"),
    TRL's convention.

    ``m = beta p_t + (1 - beta) p_s``, ``T^2 * (beta KL(p_t || m) + (1 - beta) KL(p_s || m))``;
    ``beta = 0`` is forward KL, ``beta = 1`` reverse KL. Same inputs as :class:`KLDivLoss`.
    See :func:`kdkit.functional.generalized_jsd`.
    """

    formula = staticmethod(KF.generalized_jsd)

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int | None = None,
        *,
        reduction: str = "mean",
        chunk_size: ChunkSize | None = "auto",
    ) -> None:
        super().__init__(ignore_index, reduction=reduction, chunk_size=chunk_size)
        self.beta = check_jsd_beta(beta)
        self.temperature = check_temperature(temperature)

    def hyper_parameters(self) -> tuple[float, ...]:
        return (self.beta, self.temperature)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}"


class _SkewLoss(_TokenLogitLoss):
    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        ignore_index: int | None = None,
        *,
        reduction: str = "mean",
        chunk_size: ChunkSize | None = "auto",
    ) -> None:
        super().__init__(ignore_index, reduction=reduction, chunk_size=chunk_size)
        self.alpha = check_skew_alpha(alpha)
        self.temperature = check_temperature(temperature)

    def hyper_parameters(self) -> tuple[float, ...]:
        return (self.alpha, self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, reduction={self.reduction!r}"


class SkewKLDivLoss(_SkewLoss):
    """Skew KL of DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models"): ``T^2 * KL(p_t || alpha p_t + (1 - alpha) p_s)``, ``alpha = 0.1`` by
    default.

    Same inputs as :class:`KLDivLoss`; ``alpha = 0`` is :class:`KLDivLoss`. See
    :func:`kdkit.functional.skew_kl_div`.
    """

    formula = staticmethod(KF.skew_kl_div)


class SkewReverseKLDivLoss(_SkewLoss):
    """Skew reverse KL of DistiLLM (Ko et al. 2024): ``T^2 * KL(p_s || alpha p_s + (1 - alpha)
    p_t)``, ``alpha = 0.1`` by default.

    Same inputs as :class:`KLDivLoss`; ``alpha = 0`` is :class:`ReverseKLDivLoss`. See
    :func:`kdkit.functional.skew_reverse_kl_div`.
    """

    formula = staticmethod(KF.skew_reverse_kl_div)


class TVDLoss(_KLFamilyLoss):
    """Total variation distance ``0.5 * sum_c |p_t,c - p_s,c|`` per token (as in DistiLLM, Ko et
    al. 2024, and Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge
    Distillation"), not scaled by ``T^2``.

    Same inputs as :class:`KLDivLoss`. See :func:`kdkit.functional.tvd`.
    """

    formula = staticmethod(KF.tvd)


class FusedLinearJSDLoss(DistillationLoss):
    """Generalized JSD (GKD, Agarwal et al. 2024; TRL's convention, as
    :class:`GeneralizedJSDLoss`) of the logits ``x_s W_s^T`` and ``x_t W_t^T``, computed from the
    hidden states and the lm_head weights without ever holding the ``[N, V]`` logits.

    ``loss(student_input, student_weight, teacher_input, teacher_weight, labels=None, *,
    mask=None, num_items_in_batch=None)``: hidden states ``[N, H]`` or ``[B, L, H]`` and weights
    ``[V, H]`` (``H`` may differ between student and teacher, ``V`` may not). ``beta = 0`` is
    forward KL, ``1`` reverse KL; values equal ``GeneralizedJSDLoss(beta, temperature,
    ignore_index)`` on the full logits. ``labels`` (aligned with the rows: shift them before, as
    for the logits) equal to ``ignore_index``, and ``mask``, drop tokens; ``"mean"`` divides by
    the kept count or ``num_items_in_batch``.

    ``ce_weight > 0`` adds the student's cross-entropy on the labels, computed from the same
    chunks: ``loss = JSD + ce_weight * CE`` over the kept tokens (it needs ``ignore_index`` and
    the labels). The usual LLM recipe, a distillation term beside the hard-label loss, then holds
    no ``[N, V]`` logits of the student either; through the Distiller both lm_heads run on zero
    tokens (:mod:`kdkit.fused`), where a separate cross-entropy term keeps the student's.

    The logits are computed ``chunk_size`` rows at a time and the gradients w.r.t.
    ``student_input`` and ``student_weight`` are taken in that same loop (Liger-Kernel's
    fused-linear scheme), so nothing is recomputed in the backward and the extra memory is one
    chunk's logits plus the weight's gradient. The teacher side gets no gradient. There is no
    ``reduction="none"``: the weight's gradient is summed over the tokens in the forward, before
    per-token weights could reach it.

    Why kdkit's own rather than Liger's ``LigerFusedLinearJSD`` or TRL's: Liger's is Triton
    (CUDA/ROCm/XPU only, not CPU), has no token mask or ``num_items_in_batch``, and leaves out the
    ``T^2`` factor; both use their own JSD, while this one runs kdkit's
    :func:`kdkit.functional.generalized_jsd` per chunk: exact endpoints, masked vocabularies,
    float32 math for half-precision inputs and NaN-safe dropped tokens, the same values as every
    other kdkit token loss.
    """

    takes_mask = True

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int | None = -100,
        chunk_size: ChunkSize = "auto",
        *,
        ce_weight: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        if self.ce_weight and ignore_index is None:
            raise ValueError(
                f"FusedLinearJSDLoss: ce_weight={ce_weight} trains on the labels, which need "
                "ignore_index to say which tokens have none; set ignore_index (e.g. -100, the "
                "label of padding and prompt tokens) or ce_weight=0"
            )
        if reduction == "none":
            raise ValueError(
                "FusedLinearJSDLoss: reduction='none' is not available: the lm_head weight's "
                "gradient is summed over the tokens during the forward, before per-token weights "
                "could reach it; use reduction='mean' or 'sum', or GeneralizedJSDLoss on logits"
            )
        self.beta = check_jsd_beta(beta)
        self.temperature = check_temperature(temperature)
        self.ignore_index = ignore_index
        chunk_size = check_chunk_size(chunk_size, "FusedLinearJSDLoss")
        if chunk_size is None:
            raise ValueError(
                "FusedLinearJSDLoss: chunk_size must be a positive number of token rows, got "
                "None; without chunks use GeneralizedJSDLoss on the logits"
            )
        self.chunk_size = chunk_size

    def forward(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        _check_lm_heads(student_input, student_weight, teacher_input, teacher_weight)
        tokens = student_input.shape[:-1]
        if self.ce_weight and labels is None:
            raise ValueError(
                f"FusedLinearJSDLoss(ce_weight={self.ce_weight}) needs the labels: call "
                "loss(student_input, student_weight, teacher_input, teacher_weight, labels), or "
                "through the Distiller distiller(inputs, labels)"
            )
        mask = _label_mask(self, self.ignore_index, mask, labels, tokens)
        keep = None if mask is None else check_mask(mask, tokens, student_input.device).reshape(-1)
        if self.reduction == "sum":
            denominator: float | Tensor = 1.0
        elif num_items_in_batch is not None:
            denominator = check_num_items(num_items_in_batch)
        elif keep is not None:
            denominator = keep.sum().clamp(min=1)
        else:
            denominator = float(max(tokens.numel(), 1))
        return fused_linear_rows(
            _row_function(KF.generalized_jsd, (self.beta, self.temperature)),
            student_input.reshape(-1, student_input.shape[-1]),
            student_weight,
            teacher_input.reshape(-1, teacher_input.shape[-1]),
            teacher_weight,
            keep,
            self.chunk_size,
            denominator,
            labels.reshape(-1) if self.ce_weight else None,
            self.ce_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
            f"chunk_size={self.chunk_size}, ce_weight={self.ce_weight}, "
            f"reduction={self.reduction!r}"
        )


def _check_lm_heads(
    student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor
) -> None:
    """Hidden states ``[N, H]`` / ``[B, L, H]`` with the same tokens; weights ``[V, H]``."""
    for side, hidden, weight in (
        ("student", student_input, student_weight),
        ("teacher", teacher_input, teacher_weight),
    ):
        if hidden.dim() not in (2, 3) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"FusedLinearJSDLoss: {side}_input has shape {tuple(hidden.shape)} and "
                f"{side}_weight {tuple(weight.shape)}; expected hidden states [N, H] or [B, L, H] "
                f"and the lm_head weight [V, H] with the same H (nn.Linear's weight layout)"
            )
    if student_input.shape[:-1] != teacher_input.shape[:-1]:
        raise ValueError(
            f"FusedLinearJSDLoss: student_input {tuple(student_input.shape)} and teacher_input "
            f"{tuple(teacher_input.shape)} cover different tokens; both models must see the same "
            "batch (the hidden sizes H may differ)"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"FusedLinearJSDLoss: the student's lm_head has {student_weight.shape[0]} rows (its "
            f"vocabulary) but the teacher's has {teacher_weight.shape[0]}; token distillation "
            "needs one vocabulary: slice the padded rows off the larger head "
            "(weight[:vocab_size]) or use models with the same tokenizer"
        )


class MSELogitsLoss(_TokenLogitLoss):
    """``mean((z_s - z_t)^2)``: logit matching (Ba & Caruana 2014), the high-temperature limit of
    Hinton et al. 2015.

    Its gradient ``2 (z_s - z_t) / (B * C)`` is twice the ``T -> inf`` gradient of
    ``T^2 * KL`` for zero-mean logits. Classes ``-inf`` in both models are left out; ``-inf`` in
    one model only is refused. See :func:`kdkit.functional.mse_logits`.
    """

    formula = staticmethod(KF.mse_logits)


class SparseKLDivLoss(_KLFamilyLoss):
    """``T^2 * KL(p_t || p_s)`` against a sparse teacher — its top-k log-probabilities and tail
    mass, as stored offline (DistillKit's sparse top-k distillation; Hinton, Vinyals & Dean
    2015 for the soft loss):

    ``sum_{i in K} p_i (log p_i - log q_i) + m_t (log m_t - log m_s)`` per token, ``m`` the mass
    outside the teacher's top-k K (exact KL when ``k = V``). Call it as
    ``loss(student_logits, (values, indices, log_tail), target=labels, mask=...)``, e.g. with
    :meth:`kdkit.cache.TokenCache.teacher_output`; ``mask`` or, with ``ignore_index`` set,
    ``target != ignore_index`` selects the tokens. See :func:`kdkit.functional.sparse_kl_div`
    (and :func:`kdkit.functional.topk_at_temperature` for what is exact at ``T != 1``).
    """

    formula = staticmethod(KF.sparse_kl_div)

    def __init__(
        self, temperature: float = 1.0, ignore_index: int | None = None, *, reduction: str = "mean"
    ) -> None:
        # The teacher is (values, indices, log_tail), not logits: the chunked path does not apply.
        super().__init__(temperature, ignore_index, reduction=reduction, chunk_size=None)


class CrossEntropyLoss(DistillationLoss):
    """``mean_{i: y_i >= 0} -log softmax(z_i)[y_i]``: the hard-label "student loss".

    Unlike ``torch.nn.CrossEntropyLoss`` it skips unlabeled samples (label -1) of a transfer set
    and padding (-100), and returns 0, not NaN, for a batch with no labels. See
    :func:`kdkit.functional.cross_entropy`. Use it as a term that reads only the student and the
    labels: ``Term(CrossEntropyLoss(), teacher=None, target=True)``.
    """

    needs_target = True
    reads_teacher = False
    takes_mask = True

    def forward(
        self,
        logits: Tensor,
        target: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        return KF.cross_entropy(
            logits,
            _require_target(self, target, "logits"),
            mask=mask,
            **_options(self, num_items_in_batch),
        )


class _LabeledSoftLoss(DistillationLoss):
    """A soft loss that also reads the labels, with weights ``alpha``, ``beta`` and ``T``."""

    needs_target = True
    takes_mask = True
    formula: ClassVar[staticmethod]

    def __init__(
        self, alpha: float, beta: float, temperature: float, *, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction)
        self.alpha = check_weight("alpha", alpha)
        self.beta = check_weight("beta", beta)
        self.temperature = check_temperature(temperature)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        target: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        return type(self).formula(
            student,
            teacher,
            _require_target(self, target, "student_logits, teacher_logits"),
            self.alpha,
            self.beta,
            self.temperature,
            mask=mask,
            **_options(self, num_items_in_batch),
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}"
        )


class HintonLoss(_LabeledSoftLoss):
    """``alpha * CE(y, z_s) + beta * T^2 * H(softmax(z_t / T), softmax(z_s / T))``.

    The combined loss of Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"
    (hard term at ``T = 1``). Labels -100 and ``mask`` drop a token from both terms; label -1
    (unlabeled) from the hard term only. See :func:`kdkit.functional.hinton_loss`.
    """

    formula = staticmethod(KF.hinton_loss)

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 0.9,
        temperature: float = 4.0,
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(alpha, beta, temperature, reduction=reduction)


class DKDLoss(_LabeledSoftLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): ``T^2 * (alpha * TCKD + beta * NCKD)``.

    TCKD: KL of the binary target / non-target distributions; NCKD: KL among the non-target
    classes. Samples with a negative label or dropped by ``mask`` are left out. See
    :func:`kdkit.functional.dkd`.
    """

    formula = staticmethod(KF.dkd)

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(alpha, beta, temperature, reduction=reduction)


class DISTLoss(DistillationLoss):
    """DIST (Huang et al., NeurIPS 2022): ``T^2 * (beta * inter + gamma * intra)``.

    ``inter = 1 - mean Pearson over classes per sample``, ``intra = 1 - mean Pearson over the
    batch per class``, on ``softmax(z / T)``. Token logits ``[B, L, C]`` are flattened to the
    tokens ``mask`` keeps (all of them without a mask). Not per-sample: ``reduction`` is
    ``"mean"`` only. See :func:`kdkit.functional.dist`.
    """

    takes_mask = True
    per_sample = False

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        self.beta = check_weight("beta", beta)
        self.gamma = check_weight("gamma", gamma)
        self.temperature = check_temperature(temperature)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        self.refuse_unread(mask, num_items_in_batch)
        return KF.dist(
            student,
            teacher,
            self.beta,
            self.gamma,
            self.temperature,
            mask=mask,
            validate_args=False,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"


# --------------------------------------------------------------------------------------------
# feature losses
# --------------------------------------------------------------------------------------------


class MSEHiddenStatesLoss(DistillationLoss):
    """Per-layer MSE between hidden states, averaged over layers (Romero et al. 2015, "FitNets";
    Jiao et al. 2020, "TinyBERT").

    ``loss = mean_l mean((f(W_l h_s,l) - f(h_t,l))^2)``: ``f`` is L2 normalisation over the
    feature dim when ``normalize`` (last dim of ``[B, D]`` / ``[B, L, D]``, channels of
    ``[B, C, H, W]``); ``W_l`` is the identity, or with ``need_mapping`` a learned
    ``nn.Linear(student_hidden_state_dim, teacher_hidden_state_dim)`` (applied over channels,
    i.e. a 1x1 conv, for 4D maps): one per layer when ``num_layers`` is given, else one shared.
    ``reduction="none"``: per-sample ``[B]``, or per-token ``[B, L]`` with a mask. See
    :func:`kdkit.functional.mse_hidden_states`.
    """

    takes_mask = True

    def __init__(
        self,
        normalize: bool = False,
        need_mapping: bool = False,
        teacher_hidden_state_dim: int | None = None,
        student_hidden_state_dim: int | None = None,
        num_layers: int | None = None,
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        self.normalize = normalize
        self.need_mapping = need_mapping
        self.teacher_hidden_state_dim = teacher_hidden_state_dim
        self.student_hidden_state_dim = student_hidden_state_dim
        self.num_layers = num_layers
        self.mappings: nn.ModuleList | None = None
        if not need_mapping:
            return
        if teacher_hidden_state_dim is None or student_hidden_state_dim is None:
            raise ValueError(
                "MSEHiddenStatesLoss(need_mapping=True) needs both dims to build the student -> "
                f"teacher mapping, got student_hidden_state_dim={student_hidden_state_dim} and "
                f"teacher_hidden_state_dim={teacher_hidden_state_dim}; pass both (the feature "
                "dim: last dim of [B, L, D], channels of [B, C, H, W])"
            )
        if num_layers is not None and (isinstance(num_layers, bool) or num_layers < 1):
            raise ValueError(
                f"num_layers must be a positive int or None (one shared mapping), got {num_layers}"
            )
        self.mappings = nn.ModuleList(
            nn.Linear(student_hidden_state_dim, teacher_hidden_state_dim)
            for _ in range(num_layers or 1)
        )

    def _map(self, index: int, hidden: Tensor) -> Tensor:
        assert self.mappings is not None
        mapping = self.mappings[index if self.num_layers is not None else 0]
        channel_first = hidden.dim() == 4
        features = hidden.movedim(1, -1) if channel_first else hidden
        if features.shape[-1] != self.student_hidden_state_dim:
            raise ValueError(
                f"MSEHiddenStatesLoss: student hidden state {index} has shape "
                f"{tuple(hidden.shape)}, feature dim {features.shape[-1]}, but the mapping expects "
                f"student_hidden_state_dim={self.student_hidden_state_dim}; fix the dim or the "
                "layer selection"
            )
        mapped = mapping(features)
        return mapped.movedim(-1, 1) if channel_first else mapped

    def forward(
        self,
        student: HiddenStates,
        teacher: HiddenStates,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        student_list = _as_list(student, "student")
        teacher_list = _as_list(teacher, "teacher")
        if self.mappings is not None:
            if self.num_layers is not None and len(student_list) != self.num_layers:
                raise ValueError(
                    f"MSEHiddenStatesLoss was built with num_layers={self.num_layers} mappings "
                    f"but got {len(student_list)} student hidden states; pass one per mapping or "
                    "set num_layers=None to share one mapping"
                )
            student_list = [self._map(i, s) for i, s in enumerate(student_list)]
        return KF.mse_hidden_states(
            student_list,
            teacher_list,
            normalize=self.normalize,
            mask=mask,
            **_options(self, num_items_in_batch),
        )

    def extra_repr(self) -> str:
        return (
            f"normalize={self.normalize}, need_mapping={self.need_mapping}, "
            f"reduction={self.reduction!r}"
        )


class CosineHiddenStatesLoss(DistillationLoss):
    """``mean_l mean(1 - cos(h_s,l, h_t,l))`` over the feature dim (DistilBERT, Sanh et al. 2019).

    ``reduction="none"``: per-sample ``[B]``, or per-token ``[B, L]`` with a mask. See
    :func:`kdkit.functional.cosine_hidden_states`.
    """

    takes_mask = True

    def forward(
        self,
        student: HiddenStates,
        teacher: HiddenStates,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        return KF.cosine_hidden_states(
            _as_list(student, "student"),
            _as_list(teacher, "teacher"),
            mask=mask,
            **_options(self, num_items_in_batch),
        )


def _as_layers(states: HiddenStates | None) -> list:
    """A Tensor or a list/tuple of per-layer tensors as a list; None/empty entries are left for
    the functional API to explain (sdpa attention returns no probabilities)."""
    if states is None:
        return []
    return [states] if isinstance(states, Tensor) else list(states)


class _AttentionMapLoss(DistillationLoss):
    """A loss on per-head attention maps of the same head count; ``formula`` is the functional
    form ``formula(student, teacher, student_heads, teacher_heads, mask, ...)``."""

    takes_mask = True
    formula: ClassVar[staticmethod]

    def __init__(
        self, student_heads: int, teacher_heads: int | None = None, *, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction)
        self.student_heads, self.teacher_heads = check_same_heads(
            student_heads, teacher_heads, type(self).__name__
        )

    def forward(
        self,
        student: HiddenStates,
        teacher: HiddenStates,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        return type(self).formula(
            _as_layers(student),
            _as_layers(teacher),
            self.student_heads,
            self.teacher_heads,
            mask,
            **_options(self, num_items_in_batch),
        )

    def extra_repr(self) -> str:
        return f"heads={self.student_heads}, reduction={self.reduction!r}"


class TinyBERTAttentionLoss(_AttentionMapLoss):
    """TinyBERT's attention-score MSE (Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural
    Language Understanding").

    ``mean_l mean_{b,i} mean_{h,j} (S^s_{l,h,ij} - S^t_{l,h,ij})^2`` on the pre-softmax scores
    ``S_h = Q_h K_h^T / sqrt(d_h)``, over kept queries ``i`` and keys ``j`` of a ``[B, L]``
    attention ``mask``. Reads per layer the query and the key projection ``[B, L, H * d]``:
    ``loss([q_s0, k_s0, ...], [q_t0, k_t0, ...], mask=attention_mask)``. Hidden sizes may differ;
    head counts may not (``teacher_heads`` defaults to ``student_heads``).
    ``reduction="none"``: per-sample ``[B]``, or per-query ``[B, L]`` with a mask. See
    :func:`kdkit.functional.tinybert_attention`.
    """

    formula = staticmethod(KF.tinybert_attention)


class MiniLMAttentionLoss(_AttentionMapLoss):
    """MiniLM's self-attention distribution transfer (Wang et al. 2020, "MiniLM: Deep
    Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers").

    ``mean_l mean_{b,i} mean_h KL(A^t_{l,h,i} || A^s_{l,h,i})``, ``A_h = softmax(Q_h K_h^T /
    sqrt(d_h) + M)`` (``M`` drops padded keys), averaged over heads and kept queries. Reads per
    layer the query and key projections ``[B, L, H * d]`` (any attention implementation), or the
    attention probabilities ``[B, H, L, L]`` (``output.attentions``: eager attention only).
    Hidden sizes may differ, head counts may not. See :func:`kdkit.functional.minilm_attention`.
    """

    formula = staticmethod(KF.minilm_attention)


class MiniLMValueRelationLoss(_AttentionMapLoss):
    """MiniLM's value-relation transfer (Wang et al. 2020, "MiniLM").

    ``mean_l mean_{b,i} mean_h KL(VR^t_{l,h,i} || VR^s_{l,h,i})``, ``VR_h = softmax(V_h V_h^T /
    sqrt(d_h) + M)``, averaged over heads and kept queries. Reads the value projection
    ``[B, L, H * d]`` of each layer. MiniLM adds it to :class:`MiniLMAttentionLoss` on the last
    layer. See :func:`kdkit.functional.minilm_value_relation`.
    """

    formula = staticmethod(KF.minilm_value_relation)


class MiniLMv2RelationLoss(DistillationLoss):
    """MiniLMv2's multi-head self-attention relations (Wang et al. 2021, "MiniLMv2: Multi-Head
    Self-Attention Relation Distillation for Compressing Pretrained Transformers").

    ``sum_{x in relations} mean_l mean_{b,i} mean_r KL(R^t_{x,l,r,i} || R^s_{x,l,r,i})`` with
    ``R_{x,r} = softmax(X_r X_r^T / sqrt(d_r) + M)``: each projection (query, key, value) split
    into ``relation_heads`` heads, which need only divide both models' widths: no projection,
    any hidden sizes and head counts. Reads per layer one projection ``[B, L, width]`` per name in
    ``relations``, in that order (default ``q, k, v``). See
    :func:`kdkit.functional.minilmv2_relations`.
    """

    takes_mask = True

    def __init__(
        self,
        relation_heads: int,
        relations: Sequence[str] = RELATIONS,
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        self.relation_heads = check_num_heads("relation_heads", relation_heads, "MiniLMv2")
        self.relations = check_relations(relations)

    def forward(
        self,
        student: HiddenStates,
        teacher: HiddenStates,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        return KF.minilmv2_relations(
            _as_layers(student),
            _as_layers(teacher),
            self.relation_heads,
            self.relations,
            mask,
            **_options(self, num_items_in_batch),
        )

    def extra_repr(self) -> str:
        return (
            f"relation_heads={self.relation_heads}, relations={self.relations}, "
            f"reduction={self.reduction!r}"
        )


class PatientKDLoss(DistillationLoss):
    """Patient-KD's normalized [CLS] loss (Sun et al. 2019, "Patient Knowledge Distillation for
    BERT Model Compression").

    ``mean_l mean_b || h^s_l / ||h^s_l|| - h^t_l / ||h^t_l|| ||_2^2`` on the ``[CLS]`` hidden
    state (position ``cls_index`` of ``[B, L, D]``; ``[B, D]`` as it is) of each layer pair, e.g.
    ``output.hidden_states`` paired by :func:`kdkit.capture.map_layers` (``"skip"`` / ``"last"``).
    Sequence-level, so no token mask; ``reduction="none"`` gives ``[B]``. See
    :func:`kdkit.functional.patient_kd`.
    """

    def __init__(self, cls_index: int = 0, *, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.cls_index = KF.check_cls_index(cls_index)

    def forward(
        self,
        student: HiddenStates,
        teacher: HiddenStates,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        self.refuse_unread(mask, num_items_in_batch)
        return KF.patient_kd(
            _as_list(student, "student"),
            _as_list(teacher, "teacher"),
            self.cls_index,
            **_options(self, num_items_in_batch),
        )

    def extra_repr(self) -> str:
        return f"cls_index={self.cls_index}, reduction={self.reduction!r}"


class AttentionLoss(DistillationLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to
    Attention").

    ``mean_l mean((a(F_s,l) - a(F_t,l))^2)``, ``a(F) = normalize(flatten(mean_c |F_c|^p))``;
    larger maps are pooled to the smaller spatial size. Feature maps ``[B, C, H, W]`` only, so no
    token mask. See :func:`kdkit.functional.attention_transfer`.

    Not for transformers: a ``[B, H, L, L]`` attention tensor has the shape of a feature map, and
    this loss would take its heads for channels and its query/key axes for space, ignoring the
    mask. For transformer attention use :class:`TinyBERTAttentionLoss` (pre-softmax scores),
    :class:`MiniLMAttentionLoss` / :class:`MiniLMValueRelationLoss` (attention distribution,
    value relation) or :class:`MiniLMv2RelationLoss` (query/key/value relations, any head count).
    """

    def __init__(self, p: float = 2, *, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.p = check_attention_p(p)

    def forward(
        self,
        student: HiddenStates,
        teacher: HiddenStates,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        self.refuse_unread(mask, num_items_in_batch)
        return KF.attention_transfer(
            _as_list(student, "student"),
            _as_list(teacher, "teacher"),
            p=self.p,
            **_options(self, num_items_in_batch),
        )

    def extra_repr(self) -> str:
        return f"p={self.p}, reduction={self.reduction!r}"


class PKTLoss(DistillationLoss):
    """Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018).

    ``mean_ij P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))``: KL between the teacher's and the
    student's cosine-kernel conditional probabilities over the batch. Not per-sample:
    ``reduction`` is ``"mean"`` only. See :func:`kdkit.functional.pkt`.
    """

    per_sample = False

    def __init__(self, eps: float = 1e-7, *, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.eps = eps

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        self.refuse_unread(mask, num_items_in_batch)
        return KF.pkt(student, teacher, self.eps)


class RKDLoss(DistillationLoss):
    """Relational KD (Park et al., CVPR 2019): ``distance_weight * smoothL1(psi_D^s, psi_D^t) +
    angle_weight * smoothL1(psi_A^s, psi_A^t)`` over the batch's pairwise distances and angles.

    Not per-sample: ``reduction`` is ``"mean"`` only. See :func:`kdkit.functional.rkd`.
    """

    per_sample = False

    def __init__(
        self, distance_weight: float = 25.0, angle_weight: float = 50.0, *, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction)
        self.distance_weight = check_weight("distance_weight", distance_weight)
        self.angle_weight = check_weight("angle_weight", angle_weight)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        self.refuse_unread(mask, num_items_in_batch)
        return KF.rkd(
            student, teacher, self.distance_weight, self.angle_weight, validate_args=False
        )

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


class FitNetsLoss(DistillationLoss):
    """FitNets hint loss (Romero et al., ICLR 2015): ``mean((r(h_s) - h_t)^2)``.

    ``r`` is a learned regressor on the student side: a 1x1 conv (``kind="conv"``, maps
    ``[B, C_s, H, W]``) or a linear layer (``kind="linear"``, maps the last dim of ``[B, D]`` /
    ``[B, L, D]``) from ``student_channels`` to ``teacher_channels``. A token mask applies to
    ``[B, L, D]`` features.
    """

    takes_mask = True

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        kind: str = "conv",
        *,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        if kind == "conv":
            self.regressor: nn.Module = nn.Conv2d(student_channels, teacher_channels, 1)
        elif kind == "linear":
            self.regressor = nn.Linear(student_channels, teacher_channels)
        else:
            raise ValueError(
                f"FitNetsLoss: kind must be 'conv' (for [B, C, H, W] maps) or 'linear' (for "
                f"[B, D] / [B, L, D] features), got {kind!r}"
            )
        self.kind = kind
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        mask: Tensor | None = None,
        num_items_in_batch: Count = None,
    ) -> Tensor:
        channel_dim = 1 if self.kind == "conv" else -1
        if (self.kind == "conv" and student.dim() != 4) or (
            student.shape[channel_dim] != self.student_channels
        ):
            expected = "[B, C, H, W] with C" if self.kind == "conv" else "[..., D] with D"
            raise ValueError(
                f"FitNetsLoss(kind={self.kind!r}) expects student features {expected} = "
                f"{self.student_channels}, got shape {tuple(student.shape)}"
            )
        return KF.mse_hidden_states(
            [self.regressor(student)],
            [teacher],
            mask=mask,
            **_options(self, num_items_in_batch),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.student_channels} -> {self.teacher_channels}, kind={self.kind!r}, "
            f"reduction={self.reduction!r}"
        )
