"""Test-split evaluation of a stage's model, stored as one report row (``metrics.json``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn

from kdkit.atomic import atomic_write_text
from kdkit.batch import unpack_batch
from kdkit.evaluation import count_parameters, evaluate, measure_latency, predict, size_on_disk
from kdkit.report import ModelReport

METRICS_FILE = "metrics.json"
STAGES = {"teacher": "teacher", "scratch": "scratch", "distilled": "distilled"}


def read_curves(stage_dir: Path) -> dict[str, list[tuple[float, float]]] | None:
    """Per-epoch ``val/acc`` and ``val/loss`` from the stage's CSV log, if there is one."""
    files = sorted(stage_dir.parent.glob(f"logs/csv/{stage_dir.name}/metrics.csv"))
    if not files:
        return None
    curves: dict[str, list[tuple[float, float]]] = {}
    with open(files[0], newline="") as f:
        for row in csv.DictReader(f):
            for key in ("val/acc", "val/loss", "val/agreement"):
                value = row.get(key)
                if value not in (None, "") and row.get("epoch") not in (None, ""):
                    v = float(value)
                    if math.isfinite(v):
                        curves.setdefault(key, []).append((float(row["epoch"]), v))
    return curves or None


def teacher_test_logits(teacher: nn.Module | None, datamodule: Any) -> Tensor | None:
    if teacher is None:
        return None
    logits, _ = predict(teacher, datamodule.test_dataloader())
    return logits


def evaluate_model(
    cfg: DictConfig,
    model: nn.Module,
    role: str,
    name: str,
    datamodule: Any,
    *,
    teacher_logits: Tensor | None = None,
    stage_dir: Path | None = None,
) -> ModelReport:
    """Accuracy, agreement, ECE, NLL on the test split, plus size and CPU latency."""
    loader = datamodule.test_dataloader()
    metrics = evaluate(model, loader, teacher_logits=teacher_logits)
    latency = None
    if cfg.evaluate.latency:
        batch = unpack_batch(next(iter(loader)))[0]
        latency = measure_latency(model, batch, repeats=int(cfg.evaluate.latency_repeats))
    entry = ModelReport.from_measurements(
        role,
        name,
        metrics=metrics,
        latency=latency,
        params=count_parameters(model),
        size_bytes=size_on_disk(model),
        curves=read_curves(stage_dir) if stage_dir is not None else None,
    )
    if stage_dir is not None:
        atomic_write_text(stage_dir / METRICS_FILE, json.dumps(entry.to_dict(), indent=2) + "\n")
    return entry


def load_entries(run_dir: Path) -> list[ModelReport]:
    """The report rows stored by the stages of one run folder (teacher, scratch, distilled)."""
    entries = []
    for stage in STAGES:
        path = run_dir / stage / METRICS_FILE
        if path.is_file():
            entries.append(ModelReport.from_dict(json.loads(path.read_text())))
    if not entries:
        raise FileNotFoundError(
            f"run folder {str(run_dir)!r} has no <stage>/{METRICS_FILE} (stages: "
            f"{', '.join(STAGES)}); pass run folders written by `kdkit run`, `kdkit train` or "
            "`kdkit distill`."
        )
    return entries
