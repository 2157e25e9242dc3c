"""The pipeline's Lightning callbacks, built from the ``callbacks`` and ``progress_bar`` config
groups (``configs/callbacks/*.yaml``, ``configs/progress_bar/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch import callbacks as pl_callbacks
from omegaconf import DictConfig


class _NoVersionNumber:
    """Progress-bar mixin: drop the logger version (``v_num``), which here is the stage name."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        metrics.pop("v_num", None)
        return metrics


class RichProgressBar(_NoVersionNumber, pl_callbacks.RichProgressBar):
    """Lightning's rich progress bar without the ``v_num`` column."""


class TQDMProgressBar(_NoVersionNumber, pl_callbacks.TQDMProgressBar):
    """Lightning's tqdm progress bar without the ``v_num`` column."""


def build_callbacks(cfg: DictConfig, stage_dir: Path) -> list[L.Callback]:
    """``cfg.callbacks`` instantiated in order; one with ``dirpath: null`` (the checkpoints)
    writes to ``<stage_dir>/checkpoints``. Progress bars are dropped when the trainer has them
    off (``trainer.enable_progress_bar=false``)."""
    callbacks = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None:
            continue
        here = "dirpath" in node and node.dirpath is None
        callback = instantiate(
            node, **({"dirpath": str(stage_dir / "checkpoints")} if here else {})
        )
        if isinstance(callback, pl_callbacks.ProgressBar) and not cfg.trainer.enable_progress_bar:
            continue
        callbacks.append(callback)
    return callbacks
