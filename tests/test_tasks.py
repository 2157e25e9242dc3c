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


def test_report_refuses_a_run_of_another_task_and_says_where_its_report_is(tmp_path, capfd):
    from kdkit.cli import main

    run_dir = tmp_path / "lm_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("task: lm\nexperiment_name: lm\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", f"run_dirs=[{run_dir}]", f"hydra.run.dir={tmp_path / 'report'}"])
    assert exit_info.value.code == 2
    err = capfd.readouterr().err
    assert "is a task='lm' run" in err and "wrote its own report.md" in err
