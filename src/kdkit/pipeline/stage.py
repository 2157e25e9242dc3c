"""One training stage (teacher, scratch, distilled): fit it, resuming if asked, and say what
came out (:class:`StageResult`)."""

from __future__ import annotations

import csv
import signal
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig
from torch import nn

from kdkit.pipeline.checkpoint import is_hf_model, save_hf_model
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


def fit_stage(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: Any,
    stage: str,
    stage_dir: Path,
    spec: Mapping[str, Any],
    info: Mapping[str, Any],
    *,
    resume: Resume = False,
) -> Path | None:
    """Fit one stage; returns the checkpoint it resumed from (or None).

    Resolves the checkpoint to resume (``resume``: True requires one, ``"optional"`` takes it
    if there is one; it must hold ``spec`` and belong to the run ``info``), re-seeds, and
    ``trainer.fit``; a resumed stage's CSV log keeps the rows of the epochs it completed.
    Ctrl-C becomes :class:`StageInterrupted` with the resume command: on KeyboardInterrupt
    Lightning tears down and calls ``sys.exit(1)`` (after ignoring further SIGINTs); the exit
    is caught here so the user learns how to resume, and the SIGINT handler is put back.
    """
    ckpt_path = (
        resolve_ckpt_path(cfg, stage, spec, info, required=resume != "optional") if resume else None
    )
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if ckpt_path is not None:
        _continue_csv_logs(trainer, ckpt_path)
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


def _continue_csv_logs(trainer: L.Trainer, ckpt_path: Path) -> None:
    """Keep the rows of the epochs ``ckpt_path`` completed in each CSV log of ``trainer``.

    Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, so a resumed
    run's curves would begin at the resumed epoch. The rows of later epochs (written after the
    checkpoint, before the run stopped) are dropped: the resumed run logs them again.
    """
    if not trainer.is_global_zero:  # the CSV log is written by process 0 alone
        return
    done = int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger):
            continue
        file = Path(logger.log_dir) / "metrics.csv"
        rows: list[dict[str, str]] = []
        header: list[str] = []
        if file.is_file():
            with open(file, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("epoch") and int(float(r["epoch"])) <= done]
        with warnings.catch_warnings():
            # "Previous log files in this directory will be deleted": they are kept, below.
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = logger.experiment
        writer.metrics = rows + writer.metrics
        writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))


def save_hf_stage(stage_dir: Path, model: nn.Module, datamodule: Any) -> Path | None:
    """A Hugging Face model shipped as ``<stage_dir>/hf/``: ``save_pretrained`` and the data's
    tokenizer (when the data set has one), written atomically; it loads back with
    ``AutoModelForSequenceClassification.from_pretrained`` / ``AutoTokenizer.from_pretrained``
    and is a teacher by path (``teacher.name=hf:<stage_dir>/hf``). None for other models."""
    if not is_hf_model(model):
        return None
    directory = save_hf_model(stage_dir / "hf", model, getattr(datamodule, "tokenizer", None))
    log.info("Hugging Face model and tokenizer: %s", directory)
    return directory
