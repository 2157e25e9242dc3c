"""The loss contract: what a distillation loss declares it reads, and how it reduces.

Every kdkit loss is a :class:`DistillationLoss` (after ``torch.nn.modules.loss._Loss``). The
Distiller reads these declarations; it never inspects a signature. Calling convention:

* logit losses: ``loss(student_logits, teacher_logits, *, target=None, mask=None,
  num_items_in_batch=None)``; losses with ``needs_target`` also take ``target`` as the third
  positional argument (``HintonLoss()(s, t, y)``, as torch's losses do);
* feature losses: the same, with a tensor or a list of per-layer tensors for student / teacher;
* losses that read no teacher (``reads_teacher = False``, e.g.
  :class:`kdkit.losses.CrossEntropyLoss`):
  ``loss(student_logits, target, *, mask=None, num_items_in_batch=None)``.

``reduction`` follows torch: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-sample ``[B]`` or
per-token ``[B, L]`` values, 0 at dropped positions). ``num_items_in_batch`` replaces the mean's
denominator (the kept count of this call) by a count over a whole batch, e.g. the kept tokens
across gradient-accumulation steps, so that the accumulated gradient equals the full batch's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from kdkit._checks import check_num_items

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str, who: str, per_sample: bool = True) -> str:
    """Return ``reduction`` or raise the standard error naming ``who`` and what is allowed."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{who}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got "
            f"{reduction!r}; 'none' returns per-sample / per-token values"
        )
    if not per_sample and reduction != "mean":
        raise ValueError(
            f"{who} compares the whole batch at once (it has no per-sample value), so "
            f"reduction={reduction!r} is not defined; use reduction='mean'"
        )
    return reduction


def reduce(
    values: Tensor,
    keep: Tensor | None,
    reduction: str,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Reduce per-sample / per-token ``values`` over the entries ``keep`` marks (all when None).

    ``values`` must already be finite where ``keep`` is False; those entries become 0. ``"mean"``
    divides the kept sum by ``num_items_in_batch`` when given, else by the kept count (at least 1,
    so a batch with nothing kept gives 0, not NaN).
    """
    if keep is not None:
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        values = torch.where(keep, values, zero)
    if reduction == "none":
        return values
    if plain_mean(values, keep, reduction, num_items_in_batch):
        return values.mean()  # one kernel: the common case of the hot path
    return reduce_sum(values.sum(), keep, reduction, num_items_in_batch, values.numel())


def reduce_sum(
    total: Tensor,
    keep: Tensor | None,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    numel: int,
) -> Tensor:
    """``"sum"`` or ``"mean"`` of ``numel`` values whose kept sum is ``total``: the sum, or the
    sum over ``num_items_in_batch`` when given, else over the kept count (at least 1)."""
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / check_num_items(num_items_in_batch)
    if keep is None:
        return total / max(numel, 1)
    return total / keep.sum().clamp(min=1)


def plain_mean(
    values: Tensor, keep: Tensor | None, reduction: str, num_items_in_batch: int | Tensor | None
) -> bool:
    """Whether :func:`reduce` is the plain mean of every entry of the (non-empty) ``values`` (or
    of the inputs they are computed from), so that a loss may fuse it into its own kernel
    (``F.kl_div(reduction="batchmean")``, ``F.mse_loss``): nothing masked, no outside count."""
    unmasked = keep is None and num_items_in_batch is None
    return reduction == "mean" and unmasked and values.numel() > 0


class DistillationLoss(nn.Module):
    """Base class of kdkit's losses: declarations the Distiller reads, and ``reduction``.

    Class attributes (the declarations):

    * ``needs_target``: the loss needs the labels; it then takes ``target`` positionally too.
    * ``reads_teacher``: False for losses of the student and the labels alone.
    * ``takes_mask``: the loss accepts a token ``mask=`` (bool, True = keep).
    * ``per_sample``: the loss has per-sample values, so ``reduction`` may be ``"sum"`` or
      ``"none"``; batch-relational losses (DIST, PKT, RKD) set False and refuse them.

    Instance attributes: ``temperature`` (the softmax temperature of a soft logit loss, None for
    losses on raw values: the Distiller ensembles several teachers' logits at it) and
    ``reduction``.
    """

    needs_target: ClassVar[bool] = False
    reads_teacher: ClassVar[bool] = True
    takes_mask: ClassVar[bool] = False
    per_sample: ClassVar[bool] = True
    temperature: float | None = None

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, type(self).__name__, self.per_sample)

    def reduce(
        self, values: Tensor, keep: Tensor | None, num_items_in_batch: int | Tensor | None = None
    ) -> Tensor:
        """:func:`reduce` with this loss's ``reduction``."""
        return reduce(values, keep, self.reduction, num_items_in_batch)

    def refuse_unread(self, mask: Tensor | None, num_items_in_batch: int | Tensor | None) -> None:
        """Raise for what this loss declares it does not read: a ``mask`` when ``takes_mask`` is
        False, a ``num_items_in_batch`` when it is not ``per_sample``."""
        who = type(self).__name__
        if mask is not None and not self.takes_mask:
            raise ValueError(
                f"{who} takes no token mask (takes_mask=False): it compares whole samples or "
                "feature maps, so a mask cannot select its positions; drop mask= (the Distiller "
                "hands the mask only to losses with takes_mask=True)"
            )
        if num_items_in_batch is not None and not self.per_sample:
            raise ValueError(
                f"{who} compares the samples of one call with each other (per_sample=False), so "
                f"its mean cannot be split over gradient-accumulation steps; got "
                f"num_items_in_batch={num_items_in_batch!r}, leave it None"
            )
