"""Commands finish what the README promises: one-line errors for missing hardware, network,
settings and extras; `distill` writes a report; `report` combines several runs; plots show
what they plot."""

from __future__ import annotations

import builtins
import json
import urllib.error
from pathlib import Path

import pytest
from test_pipeline import TINY  # the tiny budget the pipeline tests train with

from kdkit.cli import main
from kdkit.report import ModelReport, _accuracy_vs_latency_figure, _curves_figure


def _fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def _one_line_error(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    assert "Traceback" not in out
    return lines[0]


def test_gpu_trainer_without_a_gpu_says_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, out = _fail(["train", "trainer=gpu", *TINY, f"hydra.run.dir={tmp_path}"], capsys)
    line = _one_line_error(out)
    assert code == 2
    assert "trainer=gpu" in line and "no CUDA GPU" in line and "trainer=default" in line


def test_image_folder_without_root_says_what_to_set(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out = _fail(["train", "data=image_folder", f"hydra.run.dir={tmp_path}"], capsys)
    line = _one_line_error(out)
    assert code == 2 and "data.root" in line and "data.root=<" in line


def test_download_without_network_says_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args, **kwargs):  # noqa: ANN002, ANN003
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    code, out = _fail(
        [
            "train",
            "data=cifar10",
            "data.download=true",
            f"data.root={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capsys,
    )
    line = _one_line_error(out)
    assert code == 2
    assert "could not download" in line and "name resolution" in line
    assert "data.root=" in line and "data.download=false" in line


def test_export_without_the_extra_names_the_install_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if name.split(".")[0] in ("onnx", "onnxruntime", "onnxscript"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    code, out = _fail(
        ["export", f"checkpoint={tmp_path / 'model.pt'}", f"hydra.run.dir={tmp_path}"], capsys
    )
    line = _one_line_error(out)
    assert code == 2
    assert "pip install 'kdkit[export]'" in line and "export.onnx=false" in line


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    main(["train", "model=teacher", *TINY, f"hydra.run.dir={out}"])
    return out / "teacher" / "model.pt"


@pytest.fixture(scope="module")
def sweep(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    runs = []
    for method in ("kd", "dkd"):
        out = tmp_path_factory.mktemp(method)
        main(["distill", f"distill={method}", f"teacher.checkpoint={teacher}", *TINY,
              f"hydra.run.dir={out}"])  # fmt: skip
        runs.append(out)
    return runs


def test_distill_writes_a_report(sweep: list[Path]) -> None:
    for run_dir in sweep:
        report = json.loads((run_dir / "report.json").read_text())
        assert [m["role"] for m in report["models"]] == ["distilled"]
        assert (run_dir / "report.md").read_text().startswith("# kdkit report: digits (")


def test_report_combines_several_runs_into_one_table(sweep: list[Path], tmp_path: Path) -> None:
    a, b = sweep
    main(["report", f"run_dirs=[{a},{b}]", f"hydra.run.dir={tmp_path}"])
    combined = json.loads((tmp_path / "report.json").read_text())
    names = [m["name"] for m in combined["models"]]
    assert names == ["mlp (kd)", "mlp (dkd)"]
    accuracies = [json.loads((r / "distilled/metrics.json").read_text())["accuracy"] for r in sweep]
    assert [m["accuracy"] for m in combined["models"]] == accuracies
    md = (tmp_path / "report.md").read_text()
    assert "| mlp (kd) |" in md and "| mlp (dkd) |" in md and str(a) in md and str(b) in md
    assert (tmp_path / "accuracy_vs_latency.png").is_file()


def test_report_takes_one_run_dir_without_brackets(sweep: list[Path], tmp_path: Path) -> None:
    (sweep[0] / "report.json").unlink()
    main(["report", f"run_dirs={sweep[0]}", f"hydra.run.dir={tmp_path}"])
    rebuilt = json.loads((sweep[0] / "report.json").read_text())
    assert [m["name"] for m in rebuilt["models"]] == ["mlp (kd)"]


def test_cli_log_holds_the_runs_log(sweep: list[Path]) -> None:
    log = (sweep[0] / "cli.log").read_text()
    assert "report: " in log and "model: " in log


def _row(role: str, name: str, accuracy: float, latency: float) -> ModelReport:
    return ModelReport(role, name, accuracy=accuracy, params=4810, latency_ms_per_sample=latency)


def test_single_model_plot_has_only_its_legend_and_a_sane_y_range() -> None:
    fig = _accuracy_vs_latency_figure([_row("distilled", "mlp (kd)", 0.9806, 0.02)])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["distilled"]
    low, high = ax.get_ylim()
    assert low <= 98.06 <= high and 2.0 <= high - low <= 20.0 and high <= 101.0


def test_curves_plot_accuracy_in_percent() -> None:
    entry = ModelReport(
        "scratch",
        "mlp",
        accuracy=0.9,
        curves={"val/acc": [(0, 0.5), (1, 0.9)], "val/loss": [(0, 1.0), (1, 0.4)]},
    )
    fig = _curves_figure([entry])
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert list(by_title["val/acc (%)"].lines[0].get_ydata()) == [50.0, 90.0]
    assert list(by_title["val/loss"].lines[0].get_ydata()) == [1.0, 0.4]
