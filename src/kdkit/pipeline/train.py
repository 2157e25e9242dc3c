"""Supervised training of a teacher or of the scratch student (one Lightning fit)."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig

from kdkit.lightning import ClassifierModule
from kdkit.pipeline.build import build_model, build_optimizer_factories, build_trainer, output_dir
from kdkit.pipeline.checkpoint import save_model
from kdkit.pipeline.resume import Resume, run_info
from kdkit.pipeline.stage import StageResult, fit_stage, save_hf_stage


def train_supervised(
    cfg: DictConfig,
    datamodule: Any,
    role: str,
    stage: str,
    *,
    resume: Resume = False,
    mixup_alpha: float = 0.0,
) -> StageResult:
    """Train ``cfg.<role>`` with cross-entropy; writes ``<run>/<stage>/model.pt`` (and, for a
    Hugging Face model, ``<run>/<stage>/hf/``: :func:`~kdkit.pipeline.stage.save_hf_stage`).

    The model is initialised right after ``seed_everything(cfg.seed)`` and the data stream is
    re-seeded before fitting, so the scratch student starts from the same weights and sees the
    same batches as the distilled one. ``resume``: True resumes ``ckpt_path`` (an error when
    there is none), ``"optional"`` resumes it if this run folder has one (``kdkit run``); either
    way the checkpoint must belong to this run (:func:`~kdkit.pipeline.resume.run_info`).
    """
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, spec = build_model(cfg, role, datamodule.num_classes, datamodule.input_shape)
    optimizer, scheduler = build_optimizer_factories(cfg)
    module = ClassifierModule(model, datamodule.num_classes, optimizer, scheduler, mixup_alpha)
    stage_dir = output_dir(cfg) / stage
    epochs = cfg.teacher.max_epochs if role == "teacher" else None
    info = run_info(cfg, stage, role, mixup_alpha=mixup_alpha)
    trainer = build_trainer(cfg, stage_dir, stage, spec, max_epochs=epochs, info=info)
    resumed = fit_stage(
        cfg, trainer, module, datamodule, stage, stage_dir, spec, info, resume=resume
    )
    if trainer.is_global_zero:
        save_model(stage_dir / "model.pt", model, spec, metadata={"stage": stage})
        save_hf_stage(stage_dir, model, datamodule)
    return StageResult(model.eval(), spec, stage_dir, resumed)
