"""`task=`: the classification pipeline by default, an unknown task refused with the list."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kdkit.pipeline.tasks import DEFAULT_TASK, task_of


def test_default_task_is_classification() -> None:
    assert task_of(OmegaConf.create({})) == DEFAULT_TASK == "classification"
    assert task_of(OmegaConf.create({"task": "classification"})) == "classification"


def test_unknown_task_lists_the_tasks() -> None:
    with pytest.raises(ValueError, match="'speech' is not a kdkit task; tasks: classification"):
        task_of(OmegaConf.create({"task": "speech"}))
