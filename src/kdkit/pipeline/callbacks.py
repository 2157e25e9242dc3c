"""The pipeline's Lightning callbacks, built from the ``callbacks`` and ``progress_bar`` config
groups (``configs/callbacks/*.yaml``, ``configs/progress_bar/*.yaml``), plus
:class:`RandomState`, which every run has: a resumed run draws the random numbers the
uninterrupted one drew."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
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


class RandomState(L.Callback):
    """Stores the process's random generators in every checkpoint and restores them on resume.

    Python's ``random``, NumPy's global generator and torch's CPU (and CUDA) generators: what
    dropout, augmentation, mixup and the DataLoader's worker seeds draw from. The sample order
    needs none of this (:class:`~kdkit.data.sampler.EpochShuffleSampler` is a function of the
    epoch), nor do seeded views (``SeededViews``: the epoch). NumPy's state is kept as a tensor,
    so the checkpoint still loads with ``torch.load(weights_only=True)``.
    """

    KEY = "kdkit_rng"

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
        checkpoint[self.KEY] = {
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(self.KEY)
        if state is None:  # a checkpoint of a run without this callback: nothing to restore
            return
        random.setstate(_tuples(state["python"]))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    # random.setstate wants the tuples that a round trip through a checkpoint may turn to lists
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def build_callbacks(cfg: DictConfig, stage_dir: Path) -> list[L.Callback]:
    """:class:`RandomState`, then ``cfg.callbacks`` instantiated in order; one with
    ``dirpath: null`` (the checkpoints) writes to ``<stage_dir>/checkpoints``. Progress bars
    are dropped when the trainer has them off (``trainer.enable_progress_bar=false``)."""
    callbacks: list[L.Callback] = [RandomState()]
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
