"""Two-process DDP on CPU (gloo) through the `kdkit` command, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkit.cli import main
from kdkit.models.small import MLP
from kdkit.pipeline import load_model

BUDGET = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "progress_bar=none",
    "evaluate.latency=false",
]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_distill_on_cpu_writes_a_student_only_checkpoint(tmp_path: Path) -> None:
    main(
        [
            "train",
            "model=teacher",
            "teacher.max_epochs=1",
            *BUDGET[1:],
            f"hydra.run.dir={tmp_path / 'teacher_run'}",
        ]
    )
    teacher = tmp_path / "teacher_run/teacher/model.pt"
    run = tmp_path / "ddp_run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdkit.cli",
            "distill",
            "trainer=ddp",
            "threads=1",
            f"teacher.checkpoint={teacher}",
            *BUDGET,
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Lightning logs one line per process it joins to the group.
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    ckpt = torch.load(run / "distilled/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0
    assert not any("block" in k or "teacher" in k for k in ckpt["state_dict"])
    assert isinstance(load_model(run / "distilled/model.pt"), MLP)
