"""Lightning module for distilling a sentence encoder: dict batches of tokens, no labels.

Each training batch is a tokenizer's output (``input_ids``, ``attention_mask``, ...); teacher
and student (:class:`kdkit.models.sentence_encoder.SentenceEncoder`) both take it as keyword
arguments, and the Distiller reads ``attention_mask`` as the token mask for the terms that
compare token states. Every term is logged as ``train/<term>``. Checkpoints hold the student
and the Distiller's learned parts, never the teacher (the Distiller does not register it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from kdkit.distiller import Distiller
from kdkit.lightning import OptimizerFactory, SchedulerFactory, optimizers_for


class EmbeddingDistillationModule(L.LightningModule):
    """Trains ``distiller.student`` on label-free dict batches through a :class:`Distiller`.

    The optimizer gets every trainable parameter of the Distiller: the student's (frozen ones,
    e.g. word embeddings kept from the teacher, are left out) and its adapters / learnable loss
    parts. Without an ``optimizer`` factory: AdamW at lr 1e-4.
    """

    def __init__(
        self,
        distiller: Distiller,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.distiller = distiller
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"EmbeddingDistillationModule takes dict batches (a tokenizer's output: "
                f"input_ids, attention_mask, ...), got {type(batch).__name__}; collate with "
                "kdkit.data.sentences.TokenizeBatch"
            )
        out = self.distiller(dict(batch), epoch=self.current_epoch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        self.log_dict(
            {f"train/{k}": v for k, v in out.terms.items()}, batch_size=len(batch["input_ids"])
        )
        return out.loss

    def configure_optimizers(self) -> Any:
        return optimizers_for(
            self.distiller.parameters(),
            self.optimizer_factory,
            self.scheduler_factory,
            lambda params: torch.optim.AdamW(params, lr=1e-4),
        )
