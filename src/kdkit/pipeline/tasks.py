"""Tasks other than image classification, each a pipeline of its own behind ``kdkit run``.

``task: classification`` (the default) is the pipeline of :mod:`kdkit.pipeline.run`: a labelled
data set, accuracy, agreement, the report. Other tasks train and measure different things (a
language model's perplexity, a sentence encoder's embeddings), so an experiment names its task
(``task: lm`` in ``experiment/lm.yaml``) and ``kdkit run`` hands the composed config to that
task's ``run(cfg)``. Each entry is ``"module:function"``, imported only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

DEFAULT_TASK = "classification"
TASKS: dict[str, str] = {
    "lm": "kdkit.pipeline.lm:run",
    "sentence_embedding": "kdkit.pipeline.embedding:run",
}


def task_of(cfg: DictConfig) -> str:
    """``cfg.task`` (``classification`` when unset), checked against the known tasks."""
    task = str(cfg.get("task") or DEFAULT_TASK)
    if task != DEFAULT_TASK and task not in TASKS:
        known = ", ".join([DEFAULT_TASK, *sorted(TASKS)])
        raise ValueError(
            f"task={task!r} is not a kdkit task; tasks: {known}. Pick an experiment that sets "
            "it (experiment=<name>) or set task= to one of those."
        )
    return task


def task_runner(task: str) -> Callable[[DictConfig], Any]:
    """The ``run(cfg)`` of a non-default task."""
    module, function = TASKS[task].split(":")
    return getattr(importlib.import_module(module), function)
