"""One training stage (teacher, scratch, distilled): fit it, resuming if asked, and say what
came out (:class:`StageResult`)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import nn

from kdkit.pipeline.log import get_logger
from kdkit.pipeline.resume import Resume, interrupted_message, resolve_ckpt_path

log = get_logger(__name__)


class StageInterrupted(RuntimeError):
    """A fit stopped before its last epoch; nothing downstream (model file, report) is written."""


@dataclass
class StageResult:
    """What a stage produced: its trained model (eval mode), the model's spec, its folder, and
    the checkpoint it resumed from (None when it started afresh)."""

    model: nn.Module
    spec: dict[str, Any]
    stage_dir: Path
    resumed_from: Path | None = None

    @property
    def resumed_run_dir(self) -> Path | None:
        """The run folder of the resumed checkpoint (``<run>/<stage>/checkpoints/last.ckpt``)."""
        return self.resumed_from.parents[2] if self.resumed_from is not None else None


def fit_stage(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: Any,
    stage: str,
    stage_dir: Path,
    spec: Mapping[str, Any],
    *,
    resume: Resume = False,
    prefer: Path | None = None,
) -> Path | None:
    """Fit one stage; returns the checkpoint it resumed from (or None).

    Resolves the checkpoint to resume (``resume``: True requires a matching one,
    ``"optional"`` takes it if there is one), re-seeds the data stream, ``trainer.fit``.
    Ctrl-C becomes :class:`StageInterrupted` with the resume command: on KeyboardInterrupt
    Lightning tears down and calls ``sys.exit(1)`` (after ignoring further SIGINTs); the exit
    is caught here so the user learns how to resume, and the SIGINT handler is put back.
    """
    ckpt_path = (
        resolve_ckpt_path(cfg, stage, spec, required=resume != "optional", prefer=prefer)
        if resume
        else None
    )
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    in_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if in_main else None
    log.info("[%s] training (%s epochs) -> %s", stage, trainer.max_epochs, stage_dir)
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
    if trainer.interrupted:
        raise StageInterrupted(interrupted_message(cfg, stage, stage_dir, trainer.current_epoch))
    return ckpt_path
