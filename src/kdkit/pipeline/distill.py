"""Distillation of the student from a trained teacher (or a teacher-output cache)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from kdkit.batch import first_rows, unpack_batch
from kdkit.config import terms_from_config
from kdkit.distiller import Distiller
from kdkit.lightning import DistillationModule
from kdkit.pipeline.build import build_model, build_optimizer_factories, build_trainer, output_dir
from kdkit.pipeline.checkpoint import save_model
from kdkit.pipeline.log import get_logger
from kdkit.pipeline.resume import Resume, run_info
from kdkit.pipeline.stage import StageResult, fit_stage, save_hf_stage

log = get_logger(__name__)

PROBE_BATCH = 8


def _teacher_source(cfg: DictConfig, teacher: nn.Module | None, datamodule: Any) -> Any:
    path = cfg.distill.teacher_cache
    if not path:
        if teacher is None:
            raise ValueError(
                "distillation needs a teacher: pass teacher.checkpoint=<model.pt> or "
                "distill.teacher_cache=<dir written by `kdkit cache`>."
            )
        return teacher
    from kdkit.cache import SeededViews, TeacherCache

    # Opening checks the cache against this teacher and training split (fingerprints); a
    # cache of seeded views is checked against, and trained on, the same views.
    cache = TeacherCache.open(path, teacher=teacher)
    splits = datamodule.prepare()
    if cache.replays_views and not isinstance(splits.train, SeededViews):
        splits.train = cache.seeded_views(splits.train, None)
    cache.check(dataset=splits.train)
    return cache


FEATURE_HINT = (
    "use a student whose feature layers are feature maps (student=small_cnn) or set "
    "student.feature_layers / teacher.feature_layers to layers of matching rank"
)


def _feature_terms(terms: dict) -> dict:
    return {n: t for n, t in terms.items() if t.student_paths or t.teacher_paths}


def check_cache_features(cfg: DictConfig, datamodule: Any, teacher: nn.Module | None) -> Any:
    """Open ``distill.teacher_cache`` (None if unset), refusing feature terms it cannot feed."""
    path = cfg.distill.teacher_cache
    if not path:
        return None
    terms = _feature_terms(terms_from_config(cfg.distill))
    cache = _teacher_source(cfg, teacher, datamodule)
    stored = set(cache.feature_paths)
    wanted = sorted({p for t in terms.values() for p in t.teacher_paths})
    method = cfg.distill.method
    if wanted and not set(wanted) <= stored:
        what = f"features {sorted(stored)} only" if stored else "logits only"
        raise ValueError(
            f"distill={method} reads teacher features {wanted}; the cache at {path} stores "
            f"{what} — pass teacher.checkpoint=... instead (or build the cache with those "
            "features)."
        )
    if any(t.adapter not in (None, "identity") for t in terms.values()):
        raise ValueError(
            f"distill={method} sizes its learned adapters by probing the teacher, which a "
            f"teacher cache (distill.teacher_cache={path}) cannot do — pass "
            "teacher.checkpoint=... instead of distill.teacher_cache."
        )
    return cache


def check_feasible(cfg: DictConfig, datamodule: Any, teacher: nn.Module | None) -> Any:
    """Fail before any training if ``cfg.distill`` cannot run with this student and teacher.

    Builds an untrained student and the Distiller (which probes adapter shapes) and runs one
    loss evaluation on a few validation samples; ``teacher`` may be untrained (only shapes
    matter). With ``distill.teacher_cache`` the cache is opened and checked instead, and
    returned (pass it on to :func:`distill_student`, so it is checked once); else None.
    """
    cache = check_cache_features(cfg, datamodule, teacher)
    if cache is not None or teacher is None:
        return cache
    terms = terms_from_config(cfg.distill)
    rng = torch.random.get_rng_state()
    try:
        student, _ = build_model(cfg, "student", datamodule.num_classes, datamodule.input_shape)
        x, y, _ = unpack_batch(next(iter(datamodule.val_dataloader())))
        x, y = first_rows(x, PROBE_BATCH), y[:PROBE_BATCH]
        was_training = teacher.training
        try:
            teacher.eval()
            with torch.no_grad():
                Distiller(student, teacher, terms, example_input=x)(x, target=y)
        finally:
            teacher.train(was_training)
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:
        method = cfg.distill.method
        msg = (
            f"distill={method} cannot run with student={cfg.student.name} and "
            f"teacher={getattr(teacher, 'kdkit_spec', {}).get('name', cfg.teacher.name)}: {exc}"
        ).rstrip()
        if _feature_terms(terms):
            msg = msg.rstrip(".") + f". Fix: {FEATURE_HINT}."
        raise ValueError(msg) from None
    finally:
        torch.random.set_rng_state(rng)
    return None


def init_from_teacher(cfg: DictConfig, student: nn.Module, teacher: nn.Module | None) -> None:
    """Copy the teacher's weights into the student where names and shapes match, its layers
    picked by ``distill.init_from_teacher`` (:func:`kdkit.hf.init_student_from_teacher`)."""
    layer_map = cfg.distill.init_from_teacher
    if teacher is None:
        raise ValueError(
            f"distill.init_from_teacher={layer_map} copies the teacher's weights, but this run "
            "reads teacher outputs from a cache (distill.teacher_cache); pass "
            "teacher.checkpoint=... too, or set distill.init_from_teacher=null."
        )
    from kdkit.hf import init_student_from_teacher

    if not isinstance(layer_map, str):
        layer_map = [int(i) for i in layer_map]
    summary = init_student_from_teacher(student, teacher, layer_map)
    log.info("student initialised from the teacher: %s", str(summary).replace("\n", "; "))


def build_distiller(
    cfg: DictConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    datamodule: Any,
    cache: Any = None,
) -> Distiller:
    """The Distiller of ``cfg.distill``; ``cache``: the teacher cache already opened (and
    checked) by :func:`check_feasible`, else it is opened here when configured."""
    terms = terms_from_config(cfg.distill)
    needs_probe = any(t.adapter not in (None, "identity") for t in terms.values())
    example = None
    if needs_probe:
        x = unpack_batch(next(iter(datamodule.train_dataloader())))[0]
        example = first_rows(x, PROBE_BATCH)
    source = cache if cache is not None else _teacher_source(cfg, teacher, datamodule)
    return Distiller(student, source, terms, example_input=example)


def distill_student(
    cfg: DictConfig,
    datamodule: Any,
    teacher: nn.Module | None,
    stage: str = "distilled",
    *,
    resume: Resume = False,
    cache: Any = None,
) -> StageResult:
    """Distil ``cfg.student`` from ``teacher`` (or ``cache``, the opened teacher cache that
    :func:`check_feasible` returned); writes ``<run>/<stage>/model.pt`` (and, for a Hugging
    Face student, ``<run>/<stage>/hf/`` with the data's tokenizer).

    The student is initialised exactly like the scratch student (same seed, same order of
    random draws), then, with ``distill.init_from_teacher``, takes the teacher's weights where
    they fit (:func:`init_from_teacher`); the data stream is re-seeded before fitting. Teacher
    and student see the same augmented (and, with ``distill.mixup_alpha``, mixed) batch:
    consistent views.
    """
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student, spec = build_model(cfg, "student", datamodule.num_classes, datamodule.input_shape)
    if cfg.distill.init_from_teacher:
        init_from_teacher(cfg, student, teacher)
    distiller = build_distiller(cfg, student, teacher, datamodule, cache)
    optimizer, scheduler = build_optimizer_factories(cfg)
    module = DistillationModule(
        distiller,
        datamodule.num_classes,
        optimizer,
        scheduler,
        mixup_alpha=float(cfg.distill.mixup_alpha),
    )
    stage_dir = output_dir(cfg) / stage
    # the teacher's weights are part of the run's fingerprint (a cache names the teacher's)
    info = run_info(cfg, "distilled", "student", teacher=teacher if teacher is not None else cache)
    trainer = build_trainer(cfg, stage_dir, stage, spec, info=info)
    resumed = fit_stage(
        cfg, trainer, module, datamodule, stage, stage_dir, spec, info, resume=resume
    )
    if trainer.is_global_zero:
        save_model(
            stage_dir / "model.pt",
            student,
            spec,
            adapters=distiller.adapters,
            metadata={"stage": stage, "method": cfg.distill.method},
        )
        save_hf_stage(stage_dir, student, datamodule)
    return StageResult(student.eval(), spec, stage_dir, resumed)
