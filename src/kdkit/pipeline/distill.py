"""Distillation of the student from a trained teacher (or a teacher-output cache)."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import nn

from kdkit.distiller import Distiller
from kdkit.lightning import DistillationModule
from kdkit.pipeline.build import (
    build_model,
    build_optimizer_factories,
    build_terms,
    build_trainer,
    output_dir,
    resolve_ckpt_path,
)
from kdkit.pipeline.checkpoint import save_model
from kdkit.pipeline.train import check_finished

PROBE_BATCH = 8


def _teacher_source(cfg: DictConfig, teacher: nn.Module | None, datamodule: Any) -> Any:
    path = cfg.distill.get("teacher_cache")
    if not path:
        if teacher is None:
            raise ValueError(
                "distillation needs a teacher: pass teacher.checkpoint=<model.pt> or "
                "distill.teacher_cache=<dir written by `kdkit cache`>."
            )
        return teacher
    from kdkit.cache import TeacherCache

    # Opening checks the cache against this teacher and training split (fingerprints).
    return TeacherCache.open(path, teacher=teacher, dataset=datamodule.prepare().train)


def build_distiller(
    cfg: DictConfig, student: nn.Module, teacher: nn.Module | None, datamodule: Any
) -> Distiller:
    terms = build_terms(cfg)
    needs_probe = any(t.adapter not in (None, "identity") for t in terms.values())
    example = None
    if needs_probe:
        x = next(iter(datamodule.train_dataloader()))[0]
        example = x[:PROBE_BATCH]
    return Distiller(
        student, _teacher_source(cfg, teacher, datamodule), terms, example_input=example
    )


def distill_student(
    cfg: DictConfig,
    datamodule: Any,
    teacher: nn.Module | None,
    stage: str = "distilled",
    *,
    resume: bool = False,
) -> tuple[nn.Module, dict, L.Trainer]:
    """Distil ``cfg.student`` from ``teacher``; writes ``<run>/<stage>/model.pt``.

    The student is initialised exactly like the scratch student (same seed, same order of
    random draws) and the data stream is re-seeded before fitting. Teacher and student see the
    same augmented (and, with ``distill.mixup_alpha``, mixed) batch: consistent views.
    """
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student, spec = build_model(cfg, "student", datamodule.num_classes, datamodule.input_shape)
    distiller = build_distiller(cfg, student, teacher, datamodule)
    optimizer, scheduler = build_optimizer_factories(cfg)
    module = DistillationModule(
        distiller,
        datamodule.num_classes,
        optimizer,
        scheduler,
        mixup_alpha=float(cfg.distill.get("mixup_alpha") or 0.0),
    )
    stage_dir = output_dir(cfg) / stage
    trainer = build_trainer(cfg, stage_dir, stage, spec)
    ckpt_path = resolve_ckpt_path(cfg, stage) if resume else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    check_finished(trainer, stage)
    if trainer.is_global_zero:
        save_model(
            stage_dir / "model.pt",
            student,
            spec,
            adapters=distiller.adapters,
            metadata={"stage": stage, "method": cfg.distill.get("method")},
        )
    return student.eval(), spec, trainer
