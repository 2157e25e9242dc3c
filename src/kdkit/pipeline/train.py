"""Supervised training of a teacher or of the scratch student (one Lightning fit)."""

from __future__ import annotations

import shlex
import signal
import threading
from collections.abc import Mapping
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
    run_info,
)
from kdkit.pipeline.checkpoint import save_model


class StageInterrupted(RuntimeError):
    """A fit stopped before its last epoch; nothing downstream (model file, report) is written."""


def resume_command(cfg: DictConfig) -> str:
    """The command line that resumes this run: its overrides plus ``ckpt_path=last``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        recorded = HydraConfig.get().overrides
        # The run dir, if the user chose it, is where the checkpoint to resume lives.
        run_dir = [str(o) for o in recorded.hydra if str(o).startswith("hydra.run.dir=")]
        overrides = [str(o) for o in recorded.task] + run_dir
    except Exception:  # outside a Hydra app there are no recorded overrides
        overrides = []
    kept = [o for o in overrides if not o.startswith(("command=", "ckpt_path="))]
    return " ".join(["kdkit", str(cfg.get("command", "run")), *map(shlex.quote, kept)])


def interrupted_message(cfg: DictConfig, stage: str, stage_dir: Path, epoch: int) -> str:
    command = resume_command(cfg)
    if (stage_dir / "checkpoints" / "last.ckpt").is_file():
        return (
            f"interrupted; resume with: {command} ckpt_path=last\n(stage {stage!r} stopped in "
            f"epoch {epoch + 1}; its last complete checkpoint {stage_dir}/checkpoints/last.ckpt "
            "is kept, no model file or report was written)"
        )
    return (
        f"interrupted; stage {stage!r} stopped before its first epoch ended, so there is no "
        f"checkpoint to resume yet: run {command} again (with ckpt_path=last to reuse earlier "
        "stages of `kdkit run`). No model file or report was written."
    )


def fit_stage(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: Any,
    stage: str,
    stage_dir: Path,
    spec: Mapping[str, Any],
    *,
    resume: bool | str = False,
    prefer: Path | None = None,
) -> None:
    """Fit one stage: resolve the checkpoint to resume (``resume``: True requires a matching
    one, ``"optional"`` takes it if there is one), re-seed the data stream, ``trainer.fit``.

    Ctrl-C becomes :class:`StageInterrupted` with the resume command.

    On KeyboardInterrupt Lightning tears down and calls ``sys.exit(1)`` (after ignoring further
    SIGINTs); the exit is caught here so the user learns how to resume, and the SIGINT handler
    is put back.
    """
    ckpt_path = (
        resolve_ckpt_path(cfg, stage, spec, required=resume != "optional", prefer=prefer)
        if resume
        else None
    )
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    in_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if in_main else None
    if trainer.is_global_zero and cfg.get("progress_bar", "rich") != "none":
        print(f"[{stage}] training ({trainer.max_epochs} epochs) -> {stage_dir}", flush=True)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit as exc:
        if trainer.interrupted:
            msg = interrupted_message(cfg, stage, stage_dir, trainer.current_epoch)
            raise StageInterrupted(msg) from exc
        raise
    finally:
        if in_main and handler is not None:
            signal.signal(signal.SIGINT, handler)
    check_finished(cfg, trainer, stage, stage_dir)


def check_finished(cfg: DictConfig, trainer: L.Trainer, stage: str, stage_dir: Path) -> None:
    if trainer.interrupted:
        raise StageInterrupted(interrupted_message(cfg, stage, stage_dir, trainer.current_epoch))


def train_supervised(
    cfg: DictConfig,
    datamodule: Any,
    role: str,
    stage: str,
    *,
    resume: bool | str = False,
    mixup_alpha: float = 0.0,
    prefer: Path | None = None,
) -> tuple[nn.Module, dict, L.Trainer]:
    """Train ``cfg.<role>`` with cross-entropy; writes ``<run>/<stage>/model.pt``.

    The model is initialised right after ``seed_everything(cfg.seed)`` and the data stream is
    re-seeded before fitting, so the scratch student starts from the same weights and sees the
    same batches as the distilled one. ``resume``: True resumes ``ckpt_path`` (an error when
    nothing matches), ``"optional"`` resumes it if a matching checkpoint exists (``kdkit run``).
    """
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, spec = build_model(cfg, role, datamodule.num_classes, datamodule.input_shape)
    optimizer, scheduler = build_optimizer_factories(cfg)
    module = ClassifierModule(model, datamodule.num_classes, optimizer, scheduler, mixup_alpha)
    stage_dir = output_dir(cfg) / stage
    epochs = cfg[role].get("max_epochs") if role == "teacher" else None
    trainer = build_trainer(
        cfg, stage_dir, stage, spec, max_epochs=epochs, info=run_info(cfg, stage)
    )
    fit_stage(
        cfg, trainer, module, datamodule, stage, stage_dir, spec, resume=resume, prefer=prefer
    )
    if trainer.is_global_zero:
        save_model(stage_dir / "model.pt", model, spec, metadata={"stage": stage})
    return model.eval(), spec, trainer


def stage_model_path(cfg: DictConfig, stage: str) -> Path:
    return output_dir(cfg) / stage / "model.pt"
