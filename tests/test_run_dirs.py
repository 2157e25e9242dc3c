"""Run folders are made exclusively: runs started in the same second never share one."""

from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import kdkit
from kdkit.cli import main
from kdkit.pipeline.resolvers import forget_run_dirs, unique_dir

SRC = str(Path(kdkit.__file__).resolve().parents[1])
STAMP = "2024-01-01_12-00-00"
TINY = [
    "model=student",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "progress_bar=none",
    "evaluate.latency=false",
    "threads=1",
]


class _Frozen(datetime.datetime):
    """Every run starts in the same second (Hydra's ${now:...} reads this)."""

    @classmethod
    def now(cls, tz=None):  # noqa: ANN001, ANN206
        return cls(2024, 1, 1, 12, 0, 0)


# `kdkit` in a process whose clock says the same second as the others'.
FROZEN_KDKIT = """
import datetime, sys
import hydra.core.utils

class Frozen(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 1, 1, 12, 0, 0)

hydra.core.utils.datetime = Frozen
from kdkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path) -> None:
    script = tmp_path / "frozen_kdkit.py"
    script.write_text(FROZEN_KDKIT)
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "train", *TINY, f"seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in range(3)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    folders = sorted((tmp_path / "runs/digits").iterdir())
    assert [f.name for f in folders] == [STAMP, f"{STAMP}-1", f"{STAMP}-2"]
    seeds = set()
    for folder in folders:
        seeds.add(OmegaConf.load(folder / "config.yaml").seed)
        metrics = json.loads((folder / "student/metrics.json").read_text())
        assert [e for e, _ in metrics["curves"]["val/acc"]] == [0]  # this run's epoch only
        with open(folder / "logs/csv/student/metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["epoch"] for r in rows if r.get("val/acc")] == ["0"]
        assert (folder / "student/model.pt").is_file()
    assert seeds == {0, 1, 2}  # each folder holds one run, whole


def test_unique_dir_makes_a_new_folder_once_per_invocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    forget_run_dirs()
    first = unique_dir("runs/x/t")
    assert first == "runs/x/t" and Path(first).is_dir()
    assert unique_dir("runs/x/t") == first  # resolved again in the same invocation: the same
    forget_run_dirs()
    assert unique_dir("runs/x/t") == "runs/x/t-1"
    forget_run_dirs()
    Path("runs/x/t-2").mkdir()  # taken by someone else meanwhile
    assert unique_dir("runs/x/t") == "runs/x/t-3"
    forget_run_dirs()


def test_sweeps_started_in_the_same_second_get_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("hydra.core.utils.datetime", _Frozen)
    for _ in range(2):
        main(["train", "-m", *TINY, "seed=0,1"])
    sweeps = sorted(p.name for p in Path("runs/digits/multirun").iterdir())
    assert sweeps == [STAMP, f"{STAMP}-1"]
    for sweep in sweeps:  # both jobs of a sweep in its one folder
        jobs = Path("runs/digits/multirun", sweep)
        assert [OmegaConf.load(jobs / j / "config.yaml").seed for j in ("0", "1")] == [0, 1]
    assert sorted(p.name for p in Path("runs/digits").iterdir()) == ["multirun"]
