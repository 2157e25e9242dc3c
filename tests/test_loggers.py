"""`logger=mlflow` and `logger=wandb` (offline) for real: metrics are written and read back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kdkit.cli import main

TINY = [
    "model=student",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "progress_bar=none",
    "evaluate.latency=false",
]


def test_mlflow_logs_metrics_into_a_sqlite_store_in_the_run_folder(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    main(["train", *TINY, "logger=mlflow", f"hydra.run.dir={tmp_path}"])
    store = tmp_path / "mlflow.db"
    assert store.is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["student"]
    history = client.get_metric_history(runs[0].info.run_id, "val/acc")
    assert len(history) == 2 and all(0.0 <= m.value <= 1.0 for m in history)


def _wandb_history(path: Path) -> tuple[list[dict[str, float]], bool]:
    """The logged rows of an offline ``run-*.wandb`` file (a LevelDB-style log of protobuf
    records: a 7-byte file header, then records of crc32, length, type in 32 KiB blocks), and
    whether the run's exit record is there (wandb's service writes the file asynchronously)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, rows, finished = path.read_bytes(), 7, 32768, b"", [], False
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            finished |= record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows, finished


def _finished_wandb_history(path: Path, timeout: float = 60.0) -> list[dict[str, float]]:
    deadline = time.monotonic() + timeout
    rows, finished = _wandb_history(path)
    while not finished and time.monotonic() < deadline:
        time.sleep(0.5)
        rows, finished = _wandb_history(path)
    assert finished, f"{path} has no exit record after {timeout} s"
    return rows


def test_wandb_offline_writes_one_run_per_stage_with_the_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    main(["run", *TINY, "teacher.max_epochs=2", "logger=wandb", f"hydra.run.dir={tmp_path}"])
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 3  # teacher, scratch, distilled: never one run for all three
    for run in runs:
        (log,) = run.glob("run-*.wandb")
        history = [row for row in _finished_wandb_history(log) if "val/acc" in row]
        assert [row["epoch"] for row in history] == [0, 1]
        assert all(0.0 <= row["val/acc"] <= 1.0 for row in history)
