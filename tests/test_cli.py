"""The `kdkit` front end: commands, help, Hydra's own errors, and our errors (no training)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdkit.cli import main


def _fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def test_kdkit_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "train", "distill", "eval", "report", "export", "cache"):
        assert f"\n  {command} " in out
    assert "(digits, about 20 s on 2 CPU cores)" in out and "3 minutes" not in out
    assert main([]) == 2


def test_unknown_command_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distil"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'distil'" in err and "Did you mean 'distill'?" in err


def test_command_help_names_the_command_and_the_groups(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = 0
    try:
        main(["distill", "--help"])
    except SystemExit as exc:  # Hydra may exit 0 after printing help
        code = int(exc.code or 0)
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("kdkit distill: distil the student from teacher.checkpoint")
    for group in (
        "data:",
        "distill:",
        "teacher:",
        "student:",
        "trainer:",
        "logger:",
        "experiment:",
    ):
        assert group in out
    assert "distill: at, cosine, dist, dkd, " in out and ", fitnet, " in out
    assert "cifar100_resnet32x4_resnet8x4" in out


def test_cfg_job_prints_the_composed_config(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        main(["train", "model=student", "trainer.max_epochs=7", "--cfg", "job"])
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    assert "command: train" in out and "max_epochs: 7" in out and "model: student" in out


def test_config_typo_reaches_the_user_with_hydras_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = _fail(["run", "trainer.max_epoch=1"], capsys)
    assert code == 1
    assert "Could not override 'trainer.max_epoch'" in out
    assert "Key 'max_epoch' is not in struct" in out


def test_unknown_method_lists_the_available_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _fail(["distill", "distill=kdd"], capsys)
    assert code == 1
    assert "Could not find 'distill/kdd'" in out
    assert "Available options" in out and "dkd" in out and "reverse_kl" in out


def test_unknown_model_name_lists_the_registry(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    code, out = _fail(
        ["train", "model=student", "student.name=resnet9000", f"hydra.run.dir={tmp_path}"], capsys
    )
    assert code == 2
    assert "unknown model 'resnet9000'" in out and "small_cnn" in out and "tv:" in out


def test_unknown_dataset_lists_the_registry(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code, out = _fail(["train", "data.name=mnistt", f"hydra.run.dir={tmp_path}"], capsys)
    assert code == 2
    assert "unknown dataset data.name='mnistt'" in out and "digits" in out and "cifar100" in out


def test_distill_without_teacher_checkpoint_says_how(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    code, out = _fail(["distill", f"hydra.run.dir={tmp_path}"], capsys)
    assert code == 2 and "teacher.checkpoint=" in out


def test_missing_teacher_checkpoint_names_the_path(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    missing = tmp_path / "nope" / "model.pt"
    code, out = _fail(
        ["distill", f"teacher.checkpoint={missing}", f"hydra.run.dir={tmp_path}"], capsys
    )
    assert code == 2 and str(missing) in out and "does not exist" in out


def test_unreadable_teacher_checkpoint_names_the_path(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"this is not a torch file")
    code, out = _fail(
        ["distill", f"teacher.checkpoint={bad}", f"hydra.run.dir={tmp_path / 'run'}"], capsys
    )
    assert code == 2 and str(bad) in out and "cannot be read" in out
    assert "truncated or not a kdkit/torch model file" in out
    assert "weights_only" not in out  # torch's advice to load unsafely is not passed on


def test_console_script_module_entry_point(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kdkit.cli", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0 and "commands:" in result.stdout
