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


def ddp_distill(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """`kdkit distill trainer=ddp` (2 processes, gloo) in a subprocess: Lightning relaunches it."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kdkit.cli",
            "distill",
            "trainer=ddp",
            "threads=1",
            *BUDGET,
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=300,
    )


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
    result = ddp_distill(tmp_path, f"teacher.checkpoint={teacher}", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    # Lightning logs one line per process it joins to the group.
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    ckpt = torch.load(run / "distilled/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0
    assert not any("block" in k or "teacher" in k for k in ckpt["state_dict"])
    assert isinstance(load_model(run / "distilled/model.pt"), MLP)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_distill_reads_the_teacher_cache(tmp_path: Path) -> None:
    main(
        [
            "train",
            "model=teacher",
            "teacher.max_epochs=1",
            *BUDGET[1:],
            f"hydra.run.dir={tmp_path / 't'}",
        ]
    )
    cache = tmp_path / "cache"
    main(
        [
            "cache",
            f"teacher.checkpoint={tmp_path / 't/teacher/model.pt'}",
            f"cache.path={cache}",
            "data.augment=false",
            f"hydra.run.dir={tmp_path / 'c'}",
        ]
    )
    run = tmp_path / "d"
    result = ddp_distill(
        tmp_path, f"distill.teacher_cache={cache}", "data.augment=false", f"hydra.run.dir={run}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    assert isinstance(load_model(run / "distilled/model.pt"), MLP)
