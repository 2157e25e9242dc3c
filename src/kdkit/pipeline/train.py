"""Supervised training of a teacher or of the scratch student (one Lightning fit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import nn

from kdkit.lightning import ClassifierModule
from kdkit.pipeline.build import (
    build_model,
    build_optimizer_factories,
    build_trainer,
    output_dir,
    resolve_ckpt_path,
)
from kdkit.pipeline.checkpoint import save_model


class StageInterrupted(RuntimeError):
    """A fit stopped before its last epoch; nothing downstream (model file, report) is written."""


def check_finished(trainer: L.Trainer, stage: str) -> None:
    if trainer.interrupted:
        raise StageInterrupted(
            f"stage {stage!r} was interrupted at epoch {trainer.current_epoch}; its last complete "
            "checkpoint is kept and no model file or report was written. Resume with "
            "ckpt_path=last (or ckpt_path=<run dir>/" + stage + "/checkpoints/last.ckpt)."
        )


def train_supervised(
    cfg: DictConfig,
    datamodule: Any,
    role: str,
    stage: str,
    *,
    resume: bool = False,
    mixup_alpha: float = 0.0,
) -> tuple[nn.Module, dict, L.Trainer]:
    """Train ``cfg.<role>`` with cross-entropy; writes ``<run>/<stage>/model.pt``.

    The model is initialised right after ``seed_everything(cfg.seed)`` and the data stream is
    re-seeded before fitting, so the scratch student starts from the same weights and sees the
    same batches as the distilled one.
    """
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, spec = build_model(cfg, role, datamodule.num_classes, datamodule.input_shape)
    optimizer, scheduler = build_optimizer_factories(cfg)
    module = ClassifierModule(model, datamodule.num_classes, optimizer, scheduler, mixup_alpha)
    stage_dir = output_dir(cfg) / stage
    epochs = cfg[role].get("max_epochs") if role == "teacher" else None
    trainer = build_trainer(cfg, stage_dir, stage, spec, max_epochs=epochs)
    ckpt_path = resolve_ckpt_path(cfg, stage) if resume else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    check_finished(trainer, stage)
    if trainer.is_global_zero:
        save_model(stage_dir / "model.pt", model, spec, metadata={"stage": stage})
    return model.eval(), spec, trainer


def stage_model_path(cfg: DictConfig, stage: str) -> Path:
    return output_dir(cfg) / stage / "model.pt"
