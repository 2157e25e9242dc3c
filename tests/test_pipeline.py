"""`kdkit run|train|distill|eval|report|export` end to end on digits with tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.cli import main
from kdkit.models.small import MLP
from kdkit.pipeline import AtomicCheckpointIO, load_model
from kdkit.pipeline.checkpoint import load_model_file

TINY = [
    "trainer.max_epochs=1",
    "teacher.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "progress_bar=none",
    "evaluate.latency_repeats=2",
]


def kdkit(*argv: str) -> None:
    main(list(argv))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "digits"
    kdkit("run", *TINY, f"hydra.run.dir={out}")
    return out


def test_run_writes_report_with_numbers_for_all_three_models(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    rows = {m["role"]: m for m in report["models"]}
    assert set(rows) == {"teacher", "scratch", "distilled"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["params"] > 0
        assert row["latency_ms_per_sample"] > 0
    assert rows["distilled"]["agreement"] is not None
    assert rows["teacher"]["name"] == "small_cnn" and rows["scratch"]["name"] == "mlp"
    text = (run_dir / "report.md").read_text()
    assert "teacher" in text and "distilled" in text
    assert (run_dir / "config.yaml").is_file()
    for stage in ("teacher", "scratch", "distilled"):
        assert (run_dir / stage / "model.pt").is_file()
        assert (run_dir / stage / "checkpoints" / "last.ckpt").is_file()
    assert not list(run_dir.rglob("*.tmp"))


def test_distilled_checkpoint_has_no_teacher_and_reloads_as_its_class(run_dir: Path) -> None:
    ckpt = torch.load(run_dir / "distilled/checkpoints/last.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    # The teacher (small_cnn: block1..3) has no entry; the student (mlp: hidden, fc) has.
    assert keys and not any("block" in k or "teacher" in k for k in keys)
    keys = [k for k in keys if k.startswith("distiller.student.")]
    assert ckpt["kdkit_model"]["name"] == "mlp"
    model = load_model(run_dir / "distilled/model.pt")
    assert isinstance(model, MLP)
    student_keys = {k[len("distiller.student.") :] for k in keys}
    assert student_keys == set(model.state_dict())
    from_ckpt = load_model(run_dir / "distilled/checkpoints/last.ckpt")
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model(x), from_ckpt(x), rtol=0, atol=0)


def test_eval_reproduces_the_run_accuracy(run_dir: Path, tmp_path: Path) -> None:
    kdkit(
        "eval",
        f"checkpoint={run_dir / 'distilled/model.pt'}",
        f"teacher.checkpoint={run_dir / 'teacher/model.pt'}",
        f"hydra.run.dir={tmp_path}",
        "evaluate.latency=false",
    )
    got = json.loads((tmp_path / "eval.json").read_text())
    want = json.loads((run_dir / "distilled/metrics.json").read_text())
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert got["agreement"] == pytest.approx(want["agreement"], abs=1e-9)


def test_report_rebuilds_from_the_run_folder(run_dir: Path, tmp_path: Path) -> None:
    stored = json.loads((run_dir / "report.json").read_text())
    before = stored["models"]
    assert stored["title"] == "kdkit report: digits (small_cnn -> mlp, kd)"
    kdkit("report", f"run_dirs=[{run_dir}]", f"hydra.run.dir={tmp_path}")
    assert json.loads((run_dir / "report.json").read_text())["title"] == stored["title"]
    (run_dir / "report.json").unlink()
    (run_dir / "report.md").unlink()
    kdkit("report", f"run_dirs=[{run_dir}]", f"hydra.run.dir={tmp_path}")
    after = json.loads((run_dir / "report.json").read_text())
    assert [m["accuracy"] for m in after["models"]] == [m["accuracy"] for m in before]
    assert after["title"] == stored["title"]  # rebuilt from config.yaml, not the folder path


def test_export_onnx_matches_torch(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ort = pytest.importorskip("onnxruntime")
    with pytest.warns() as record:
        import warnings

        warnings.warn("sentinel", UserWarning, stacklevel=1)  # pytest.warns needs one
        kdkit("export", f"checkpoint={run_dir / 'distilled/model.pt'}", f"hydra.run.dir={tmp_path}")
    assert not [w for w in record if "Tracer" in type(w.message).__name__]
    err = capsys.readouterr().err  # kdkit's log; the exporters' own chatter is silenced
    assert not [line for line in err.splitlines() if "onnxscript" in line or "onnx_ir" in line]
    assert "ONNX checked in onnxruntime: max |diff| = " in err and "(atol 0.0001)" in err
    assert f"onnx written: {tmp_path / 'model.onnx'}" in err
    assert f"torchscript written: {tmp_path / 'model.ts'}" in err
    assert (tmp_path / "model.ts").is_file()
    model = load_model(run_dir / "distilled/model.pt")
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch_out = model(x).numpy()
    assert np.abs(onnx_out - torch_out).max() <= 1e-4


def test_teacher_with_other_class_count_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        kdkit(
            "distill",
            "data=synthetic",
            f"teacher.checkpoint={run_dir / 'teacher/model.pt'}",
            f"hydra.run.dir={tmp_path}",
            *TINY,
        )
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "predicts 10 classes but dataset 'synthetic' has 4" in err


def test_train_is_repeatable_with_a_seed(tmp_path: Path) -> None:
    for name in ("a", "b"):
        kdkit(
            "train",
            "model=student",
            "seed=3",
            *TINY,
            f"hydra.run.dir={tmp_path / name}",
            "evaluate.latency=false",
        )
    a = load_model_file(tmp_path / "a/student/model.pt")["state_dict"]
    b = load_model_file(tmp_path / "b/student/model.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_multirun_sweeps_methods(run_dir: Path, tmp_path: Path) -> None:
    kdkit(
        "distill",
        "-m",
        "distill=kd,dkd",
        f"teacher.checkpoint={run_dir / 'teacher/model.pt'}",
        f"hydra.sweep.dir={tmp_path}",
        *TINY,
        "evaluate.latency=false",
    )
    for job, method in (("0", "kd"), ("1", "dkd")):
        meta = load_model_file(tmp_path / job / "distilled/model.pt")["metadata"]
        assert meta["method"] == method


class _Crash(RuntimeError):
    pass


def test_interrupted_distill_leaves_no_partial_files_and_resumes(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdkit.lightning import DistillationModule

    original = DistillationModule.training_step
    calls = {"n": 0}

    def crashing(self, batch, batch_idx):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 5:  # in the second epoch: epoch 1 is checkpointed
            raise _Crash("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DistillationModule, "training_step", crashing)
    teacher = f"teacher.checkpoint={run_dir / 'teacher/model.pt'}"
    budget = [
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "progress_bar=none",
        "evaluate.latency=false",
    ]
    with pytest.raises(SystemExit):
        kdkit("distill", teacher, *budget, f"hydra.run.dir={tmp_path}")
    assert not (tmp_path / "distilled/model.pt").exists()
    assert not (tmp_path / "distilled/metrics.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    last = tmp_path / "distilled/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0  # the complete first epoch

    monkeypatch.setattr(DistillationModule, "training_step", original)
    kdkit("distill", teacher, *budget, f"hydra.run.dir={tmp_path}", "ckpt_path=last")
    assert torch.load(last, weights_only=False)["epoch"] == 1
    assert isinstance(load_model(tmp_path / "distilled/model.pt"), MLP)


def test_atomic_checkpoint_io_keeps_the_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    def broken_save(obj, f):  # noqa: ANN001
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_cache_then_distill_from_it(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdkit.cache import TeacherCache

    teacher = run_dir / "teacher/model.pt"
    cache_dir = tmp_path / "cache"
    kdkit(
        "cache",
        f"teacher.checkpoint={teacher}",
        f"cache.path={cache_dir}",
        f"hydra.run.dir={tmp_path / 'c'}",
        "data.augment=false",
    )
    assert (cache_dir / "meta.json").is_file()
    checks = []
    original_check = TeacherCache.check

    def counted(self, **kwargs):  # noqa: ANN001, ANN003
        if kwargs.get("dataset") is not None:  # hashes every array of the training split
            checks.append(kwargs)
        return original_check(self, **kwargs)

    monkeypatch.setattr(TeacherCache, "check", counted)
    out = tmp_path / "d"
    kdkit(
        "distill",
        *TINY,
        f"distill.teacher_cache={cache_dir}",
        "data.augment=false",
        f"hydra.run.dir={out}",
        "evaluate.latency=false",
    )
    assert isinstance(load_model(out / "distilled/model.pt"), MLP)
    assert len(checks) == 1  # the training split is hashed against the cache once per run
    metrics = json.loads((out / "distilled/metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_unlabeled_transfer_set_and_mixup_train(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "u"
    kdkit(
        "distill",
        *TINY,
        f"teacher.checkpoint={run_dir / 'teacher/model.pt'}",
        "data.labeled_fraction=0.1",
        "distill.mixup_alpha=0.2",
        f"hydra.run.dir={out}",
        "evaluate.latency=false",
    )
    metrics = json.loads((out / "distilled/metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0


def _err(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        kdkit(*argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def test_ckpt_path_last_resumes_only_a_matching_run(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    teacher = f"teacher.checkpoint={run_dir / 'teacher/model.pt'}"
    quick = [*TINY, "evaluate.latency=false"]
    kdkit("distill", teacher, *quick, "hydra.run.dir=runs/digits/a")
    kd_ckpt = Path("runs/digits/a/distilled/checkpoints/last.ckpt")
    assert kd_ckpt.is_file()
    capsys.readouterr()

    # another method: the kd checkpoint is named and refused, with the way out
    code, out = _err(
        capsys,
        "distill",
        teacher,
        "distill=dkd",
        *quick,
        "hydra.run.dir=runs/digits/a",
        "ckpt_path=last",
    )
    assert code == 2
    assert str(kd_ckpt) in out and "trained with distill=kd, this run uses distill=dkd" in out
    assert "drop ckpt_path" in out
    assert (
        torch.load(kd_ckpt, weights_only=True)["kdkit_run"]["fingerprint"]["distill"]["method"]
        == "kd"
    )

    # another student, explicit path: a clear message instead of load_state_dict's RuntimeError
    code, out = _err(
        capsys,
        "distill",
        teacher,
        "student=mlp_tiny",
        *quick,
        "hydra.run.dir=runs/digits/c",
        f"ckpt_path={kd_ckpt}",
    )
    assert code == 2 and "cannot resume stage 'distilled'" in out and "holds model mlp(" in out
    assert "RuntimeError" not in out

    # the same run: resumed, and said so
    kdkit("distill", teacher, *quick, "hydra.run.dir=runs/digits/a", "ckpt_path=last")
    out = capsys.readouterr().err  # the log
    assert f"resuming from {kd_ckpt} (epoch 1; already complete, reusing it)" in out


@pytest.mark.parametrize("named", [True, False], ids=["run-dir-given", "default-run-dir"])
def test_ctrl_c_prints_the_resume_command_and_writes_nothing_half(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, named: bool
) -> None:
    import signal

    from kdkit.lightning import DistillationModule

    monkeypatch.chdir(tmp_path)
    original = DistillationModule.training_step
    calls = {"n": 0}

    def ctrl_c(self, batch, batch_idx):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 5:  # second epoch: the first one is checkpointed
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DistillationModule, "training_step", ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    teacher = f"teacher.checkpoint={run_dir / 'teacher/model.pt'}"
    budget = ["trainer.max_epochs=2", "trainer.limit_train_batches=3", "progress_bar=none"]
    given = [f"hydra.run.dir={tmp_path / 'named'}"] if named else []
    code, out = _err(capsys, "distill", teacher, *budget, *given)
    assert code == 130
    (out_dir,) = [tmp_path / "named"] if named else Path("runs/digits").iterdir()
    assert "interrupted; resume with: kdkit distill " in out
    # the command names the run folder, also the timestamped one the user never typed
    assert teacher in out and f"hydra.run.dir={tmp_path / out_dir} ckpt_path=last" in out
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning's SIG_IGN is undone
    assert not (out_dir / "distilled/model.pt").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    last = out_dir / "distilled/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0

    monkeypatch.setattr(DistillationModule, "training_step", original)
    kdkit(*out.split("resume with: kdkit ", 1)[1].split("\n", 1)[0].split())  # as printed
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert (out_dir / "distilled/model.pt").is_file()


def test_feature_method_with_mlp_student_fails_before_training(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    code, out = _err(capsys, "run", "distill=mse_hidden", *TINY, f"hydra.run.dir={tmp_path}")
    assert code == 2
    assert "distill=mse_hidden cannot run with student=mlp and teacher=small_cnn" in out
    assert out.rstrip().endswith(
        "use a student whose feature layers are feature maps (student=small_cnn) or set "
        "student.feature_layers / teacher.feature_layers to layers of matching rank."
    )
    assert not (tmp_path / "teacher").exists()  # nothing trained
    teacher = f"teacher.checkpoint={run_dir / 'teacher/model.pt'}"
    code, out = _err(capsys, "distill", teacher, "distill=fitnet", f"hydra.run.dir={tmp_path}")
    assert code == 2 and "student=small_cnn" in out
    assert not (tmp_path / "distilled").exists()


def test_feature_method_with_a_logits_cache_names_the_fix(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    cache_dir = tmp_path / "cache"
    kdkit(
        "cache",
        f"teacher.checkpoint={run_dir / 'teacher/model.pt'}",
        f"cache.path={cache_dir}",
        f"hydra.run.dir={tmp_path / 'c'}",
        "data.augment=false",
    )
    code, out = _err(
        capsys,
        "distill",
        "distill=fitnet",
        "student=small_cnn",
        f"distill.teacher_cache={cache_dir}",
        "data.augment=false",
        f"hydra.run.dir={tmp_path / 'd'}",
    )
    assert code == 2
    assert "distill=fitnet reads teacher features ['block1', 'block2', 'block3']" in out
    assert f"the cache at {cache_dir} stores logits only — pass teacher.checkpoint=" in out
    assert "has no teacher module" not in out


def test_teacher_name_comes_from_the_checkpoint(run_dir: Path, tmp_path: Path, capsys) -> None:
    kdkit(
        "distill",
        f"teacher.checkpoint={run_dir / 'scratch/model.pt'}",  # an mlp, not small_cnn
        *TINY,
        "evaluate.latency=false",
        f"hydra.run.dir={tmp_path}",
    )
    captured = capsys.readouterr()
    assert "holds a 'mlp' model, not teacher.name='small_cnn'" in captured.err
    assert "(mlp -> mlp, kd)" in captured.out
    assert "small_cnn -> mlp" not in captured.out


def test_augmented_cache_replays_its_views_in_distill(run_dir: Path, tmp_path: Path) -> None:
    from kdkit.cache import TeacherCache

    cache_dir = tmp_path / "views"
    kdkit(
        "cache",
        f"teacher.checkpoint={run_dir / 'teacher/model.pt'}",
        f"cache.path={cache_dir}",
        "data.augment=true",
        "cache.epochs=2",
        f"hydra.run.dir={tmp_path / 'c'}",
    )
    cache = TeacherCache.open(cache_dir)
    assert cache.replays_views and cache.num_views == 2
    out = tmp_path / "d"
    kdkit(
        "distill",
        *TINY,
        "trainer.max_epochs=2",
        f"distill.teacher_cache={cache_dir}",
        "data.augment=true",
        f"hydra.run.dir={out}",
        "evaluate.latency=false",
    )
    assert isinstance(load_model(out / "distilled/model.pt"), MLP)
    # Without the augmentation the cache was built with, the views cannot match: refused.
    with pytest.raises(SystemExit):
        kdkit(
            "distill",
            *TINY,
            f"distill.teacher_cache={cache_dir}",
            "data.augment=false",
            f"hydra.run.dir={tmp_path / 'e'}",
        )
