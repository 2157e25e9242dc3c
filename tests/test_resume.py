"""Resume continues the right run (fingerprint, run folder) and reproduces it exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kdkit
from kdkit.cli import main
from kdkit.pipeline.checkpoint import build_from_spec, load_model_file, model_spec, save_model

SRC = str(Path(kdkit.__file__).resolve().parents[1])
QUICK = [
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "progress_bar=none",
    "evaluate.latency=false",
]


def make_teacher(path: Path, seed: int = 0) -> str:
    """An untrained small_cnn teacher file: distillation from it is as deterministic as any."""
    torch.manual_seed(seed)
    spec = model_spec("small_cnn", {"width": 8}, 10, (1, 8, 8), "teacher")
    save_model(path, build_from_spec(spec), spec)
    return f"teacher.checkpoint={path}"


def kdkit_process(cwd: Path, *argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kdkit.cli", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def kill_after_epoch(proc: subprocess.Popen[str], checkpoints: Path, epoch: int) -> None:
    """SIGKILL ``proc`` as soon as the checkpoint of ``epoch`` (0-based) or later appears."""
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            names = [p.name for p in checkpoints.glob("epoch*.ckpt")]
            if any(int(n[5:8]) >= epoch for n in names):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill_9_then_resume_ends_bitwise_where_the_uninterrupted_run_ends(tmp_path: Path) -> None:
    epochs = 5
    teacher = make_teacher(tmp_path / "teacher.pt")
    args = [
        "distill",
        teacher,
        f"trainer.max_epochs={epochs}",
        "trainer.limit_val_batches=2",
        "data.augment=true",  # random shifts: the global torch RNG
        "distill.mixup_alpha=0.2",  # Beta draws and permutations: the global torch RNG
        "threads=1",
        "progress_bar=none",
        "evaluate.latency=false",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    uninterrupted = kdkit_process(tmp_path, *args, f"hydra.run.dir={whole}")
    killed = kdkit_process(tmp_path, *args, f"hydra.run.dir={cut}")
    kill_after_epoch(killed, cut / "distilled/checkpoints", epoch=2)
    finish(uninterrupted)
    last = cut / "distilled/checkpoints/last.ckpt"
    stopped = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= stopped < epochs - 1, stopped
    assert not (cut / "distilled/model.pt").exists()

    out = finish(kdkit_process(tmp_path, *args, f"hydra.run.dir={cut}", "ckpt_path=last"))
    shown = last.relative_to(tmp_path)  # paths below the working directory are shown relative
    assert f"resuming from {shown} (epoch {stopped + 1})" in out

    a = load_model_file(whole / "distilled/model.pt")["state_dict"]
    b = load_model_file(cut / "distilled/model.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics_a = json.loads((whole / "distilled/metrics.json").read_text())
    metrics_b = json.loads((cut / "distilled/metrics.json").read_text())
    assert metrics_a == metrics_b
    # the curves cover the whole run, epoch 0 included
    assert [e for e, _ in metrics_b["curves"]["val/acc"]] == list(range(epochs))
    csv_a = (whole / "logs/csv/distilled/metrics.csv").read_text()
    assert (cut / "logs/csv/distilled/metrics.csv").read_text() == csv_a


# ---- the run a checkpoint belongs to ------------------------------------------------------------


def _err(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


@pytest.fixture
def first_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A finished 1-epoch `kdkit distill` in runs/digits/a (cwd: tmp_path)."""
    monkeypatch.chdir(tmp_path)
    teacher = make_teacher(tmp_path / "teacher.pt")
    main(["distill", teacher, "trainer.max_epochs=1", *QUICK, "hydra.run.dir=runs/digits/a"])
    return teacher, Path("runs/digits/a/distilled/checkpoints/last.ckpt")


def test_resume_with_another_seed_teacher_or_data_names_what_differs(
    first_run: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, ckpt = first_run
    other_teacher = make_teacher(tmp_path / "other.pt", seed=1)
    run = "hydra.run.dir=runs/digits/a"
    common = ["trainer.max_epochs=2", *QUICK, run, "ckpt_path=last"]
    capsys.readouterr()

    code, out = _err(capsys, "distill", teacher, "seed=1", *common)
    assert code == 2 and str(ckpt) in out
    assert "seed: 0 in the checkpoint, 1 in this run" in out
    assert "start afresh" in out and "drop ckpt_path" in out

    code, out = _err(capsys, "distill", other_teacher, *common)
    assert code == 2 and "teacher: other weights" in out and "seed" not in out

    code, out = _err(
        capsys, "distill", teacher, "data.augment=true", "distill.temperature=2", *common
    )
    assert code == 2
    assert "data.augment: False in the checkpoint, True in this run" in out
    assert "distill.temperature: 4.0 in the checkpoint, 2 in this run" in out

    # an explicit file is checked just the same
    code, out = _err(capsys, "distill", teacher, "seed=1", *common[:-1], f"ckpt_path={ckpt}")
    assert code == 2 and "seed: 0 in the checkpoint, 1 in this run" in out

    # the same run: resumed (a longer budget is the same run, trained further)
    main(["distill", teacher, *common])
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1


def test_ckpt_path_last_never_takes_another_folders_checkpoint(
    first_run: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, ckpt = first_run
    capsys.readouterr()
    # identical settings, but another run folder: its checkpoint is named, not taken
    code, out = _err(
        capsys,
        "distill",
        teacher,
        "trainer.max_epochs=2",
        *QUICK,
        "hydra.run.dir=runs/digits/b",
        "ckpt_path=last",
    )
    assert code == 2
    assert "no distilled/checkpoints/last.ckpt in this run folder runs/digits/b" in out
    assert "hydra.run.dir=runs/digits/a" in out
    assert not Path("runs/digits/b/distilled/checkpoints").exists()
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0


# ---- the sample order -----------------------------------------------------------------------


def _order(loader) -> list[int]:  # noqa: ANN001
    return [int(i) for batch in loader for i in batch[2]]


def test_the_order_of_an_epoch_depends_only_on_seed_and_epoch() -> None:
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled

    from kdkit.data import KDDataModule

    running = KDDataModule(seed=3).train_dataloader()
    orders = []
    for epoch in range(4):
        running.sampler.set_epoch(epoch)
        orders.append(_order(running))
    assert len({tuple(o) for o in orders}) == 4  # a new order every epoch
    assert sorted(orders[0]) == list(range(1077))
    # a fresh loader (a resumed run) at epoch 3 serves exactly what the running one served
    fresh = KDDataModule(seed=3).train_dataloader()
    fresh.sampler.set_epoch(3)
    assert _order(fresh) == orders[3]
    other = KDDataModule(seed=4).train_dataloader()
    other.sampler.set_epoch(2)  # seed 4 epoch 2 is not seed 3 epoch 3 (seeds are mixed)
    assert _order(other) not in orders
    assert _is_dataloader_shuffled(fresh)  # Lightning (and DDP's sampler) see a shuffle


def test_a_negative_data_seed_is_refused() -> None:
    from kdkit.data import KDDataModule

    with pytest.raises(ValueError, match=r"seed must be an int >= 0 .* got -1"):
        KDDataModule(seed=-1)
