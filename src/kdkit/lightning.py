"""Lightning modules: supervised training (teachers, scratch baselines) and distillation.

Both read batches ``(x, y)`` or ``(x, y, index)``, or Hugging Face dict batches (``input_ids``,
``attention_mask``, ..., ``labels``, ``index``: the model is called with the other keys as keyword
arguments and its logits are read from its output, :func:`kdkit.batch.unpack_batch`); labels
equal to -1 mark unlabeled samples of a transfer set (they are ignored by the cross-entropy
here; the teacher labels them through the distillation terms). The distillation module's
checkpoints hold the student, its adapters and learnable loss parts, never the teacher (it is not
a registered submodule of the Distiller).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kdkit.batch import UNLABELED, call_model, unpack_batch
from kdkit.capture import select_tensor
from kdkit.distiller import Distiller
from kdkit.functional import cross_entropy

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def adam(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer when a module is given none: Adam at lr 1e-3."""
    return torch.optim.Adam(params, lr=1e-3)


def optimizers_for(
    parameters: Iterable[nn.Parameter],
    optimizer: OptimizerFactory | None,
    scheduler: SchedulerFactory | None,
    default: OptimizerFactory,
) -> Any:
    """``configure_optimizers``' answer: ``optimizer`` (else ``default``) over the trainable
    ``parameters``, with ``scheduler``'s scheduler on it when one is given."""
    params = [p for p in parameters if p.requires_grad]
    opt = (optimizer or default)(params)
    if scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt)}}


def mixup(x: Tensor, y: Tensor, alpha: float, num_classes: int) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al. 2018): convex mix of shuffled pairs; labels become soft targets.

    Unlabeled samples (label -1) contribute no label mass.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    onehot = nn.functional.one_hot(y.clamp_min(0), num_classes).to(x.dtype)
    onehot = onehot * (y != UNLABELED).unsqueeze(-1)
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]


class _ClassificationModule(L.LightningModule):
    """Shared optimiser set-up, validation and test metrics."""

    def __init__(
        self,
        num_classes: int,
        optimizer: OptimizerFactory | None,
        scheduler: SchedulerFactory | None,
        mixup_alpha: float,
    ) -> None:
        super().__init__()
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 turns mixup off), got {mixup_alpha}.")
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.mixup_alpha = mixup_alpha
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=UNLABELED)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=UNLABELED)

    @property
    def model(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: Any) -> Tensor:
        """The model's logits for inputs ``x`` (a tensor, a tuple, or a dict of keyword
        arguments)."""
        return select_tensor(call_model(self.model, x))

    def on_train_epoch_start(self) -> None:
        # Seeded-view datasets (kdkit.cache.SeededViews) serve the view of the current epoch.
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def configure_optimizers(self) -> Any:
        return optimizers_for(
            self.parameters(), self.optimizer_factory, self.scheduler_factory, adam
        )

    def _mix(self, x: Any, y: Tensor) -> tuple[Any, Tensor]:
        if self.mixup_alpha > 0:
            if not isinstance(x, Tensor):
                raise ValueError(
                    f"mixup mixes input tensors, but this batch's inputs are a "
                    f"{type(x).__name__} (e.g. token ids, which cannot be mixed); set "
                    "distill.mixup_alpha=0 for this data set."
                )
            return mixup(x, y, self.mixup_alpha, self.num_classes)
        return x, y

    def _eval_step(self, batch: Any, metric: MulticlassAccuracy, stage: str) -> Tensor:
        x, y, _ = unpack_batch(batch)
        logits = self(x)
        metric.update(logits, y)
        self.log(f"{stage}/loss", cross_entropy(logits, y), prog_bar=False)
        self.log(f"{stage}/acc", metric, prog_bar=True)
        return logits

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, self.val_acc, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")


class ClassifierModule(_ClassificationModule):
    """Plain supervised training with cross-entropy: for teachers and the scratch student."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        mixup_alpha: float = 0.0,
    ) -> None:
        super().__init__(num_classes, optimizer, scheduler, mixup_alpha)
        self.net = model

    @property
    def model(self) -> nn.Module:
        return self.net

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, _ = unpack_batch(batch)
        x, y = self._mix(x, y)
        loss = cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss


class DistillationModule(_ClassificationModule):
    """Trains ``distiller.student`` through a :class:`~kdkit.Distiller`.

    Teacher and student see the same (augmented, optionally mixed-up) batch: consistent views.
    Every term is logged as ``train/<term>`` (detached tensors; Lightning reads them at its log
    interval, not every step). Validation also logs top-1 agreement with the teacher.
    """

    def __init__(
        self,
        distiller: Distiller,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        mixup_alpha: float = 0.0,
    ) -> None:
        super().__init__(num_classes, optimizer, scheduler, mixup_alpha)
        self.distiller = distiller
        self.val_agreement = MulticlassAccuracy(num_classes, average="micro")

    @property
    def model(self) -> nn.Module:
        return self.distiller.student

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = unpack_batch(batch)
        if self.mixup_alpha > 0 and self.distiller.teacher is None:
            raise ValueError(
                "mixup changes the inputs, so cached teacher outputs no longer match them; use "
                "the online teacher with mixup (distill.mixup_alpha=0 to keep the cache)."
            )
        x, y = self._mix(x, y)
        out = self.distiller(x, y, index=index, epoch=self.current_epoch)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in out.terms.items()})
        return out.loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits = super().validation_step(batch, batch_idx)
        if self.distiller.teachers:
            x, _, _ = unpack_batch(batch)
            t_pred = self.distiller.compute_teacher_logits(x).argmax(-1)
            self.val_agreement.update(logits, t_pred)
            self.log("val/agreement", self.val_agreement)
        return logits
