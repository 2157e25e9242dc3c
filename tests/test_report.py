"""kdkit.report: files, numbers in them, JSON round trip, atomic writes, terminal table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from kdkit import report
from kdkit.report import (
    ModelReport,
    build_report,
    load_report,
    print_report,
    render_table,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _entries(with_curves: bool = True) -> list[ModelReport]:
    curves = {"val/acc": [(0, 0.5), (1, 0.8), (2, 0.9)], "train/loss": [(0, 2.0), (1, 1.0)]}
    return [
        ModelReport(
            role="teacher",
            name="resnet",
            accuracy=0.925,
            agreement=1.0,
            ece=0.031,
            nll=0.25,
            params=400_000,
            size_bytes=1_600_000,
            latency_ms_per_sample=10.0,
            latency_ms_per_batch=80.0,
            curves=curves if with_curves else None,
        ),
        ModelReport(
            role="scratch",
            name="mlp-scratch",
            accuracy=0.825,
            agreement=0.85,
            ece=0.052,
            nll=0.61,
            params=20_000,
            size_bytes=100_000,
            latency_ms_per_sample=2.5,
            latency_ms_per_batch=5.0,
            curves={"val/acc": [(0, 0.4), (1, 0.7), (2, 0.8)]} if with_curves else None,
        ),
        ModelReport(
            role="distilled",
            name="mlp-kd",
            accuracy=0.875,
            agreement=0.9125,
            ece=0.044,
            nll=0.48,
            params=20_000,
            size_bytes=100_000,
            latency_ms_per_sample=2.5,
            latency_ms_per_batch=5.0,
        ),
    ]


def test_build_report_writes_all_files(tmp_path: Path) -> None:
    out = build_report(_entries(), tmp_path / "run", title="Digits KD", config={"seed": 0})
    assert out == tmp_path / "run"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["accuracy_vs_latency.png", "curves.png", "report.json", "report.md"]
    for png in ("accuracy_vs_latency.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert (out / png).stat().st_size > 5_000


def test_report_json_round_trips(tmp_path: Path) -> None:
    entries = _entries()
    build_report(entries, tmp_path, title="t", config={"lr": 0.01, "path": tmp_path})
    loaded = load_report(tmp_path)  # the directory works as well as the file
    assert loaded == load_report(tmp_path / "report.json")
    # build_report fills speed-ups from the teacher's latency per sample: 10 / 2.5 = 4.
    assert [e.speedup_vs_teacher for e in loaded] == [1.0, 4.0, 4.0]
    for original, back in zip(entries, loaded, strict=True):
        assert back == ModelReport(
            **{
                **original.__dict__,
                "speedup_vs_teacher": 10.0 / (original.latency_ms_per_sample or 1),
            }
        )
    assert loaded[0].curves == {
        "val/acc": [(0, 0.5), (1, 0.8), (2, 0.9)],
        "train/loss": [(0, 2.0), (1, 1.0)],
    }
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["title"] == "t"
    assert data["config"] == {"lr": 0.01, "path": str(tmp_path)}
    (summary,) = data["summary"]
    assert summary["name"] == "mlp-kd"
    assert summary["gap_closed"] == pytest.approx(0.5)  # (87.5 - 82.5) / (92.5 - 82.5)
    assert summary["speedup_vs_teacher"] == pytest.approx(4.0)
    assert summary["size_ratio"] == pytest.approx(16.0)  # 1.6 MB / 0.1 MB


def test_report_md_contains_the_numbers(tmp_path: Path) -> None:
    build_report(_entries(), tmp_path, title="Digits KD")
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Digits KD\n")
    teacher_row = next(line for line in md.splitlines() if line.startswith("| teacher"))
    for cell in (
        "resnet",
        "92.50",
        "100.00",
        "0.0310",
        "0.2500",
        "400,000",
        "1.60",
        "10.000",
        "80.000",
        "1.00×",
    ):
        assert f" {cell} " in teacher_row
    kd_row = next(line for line in md.splitlines() if line.startswith("| distilled"))
    for cell in ("mlp-kd", "87.50", "91.25", "20,000", "0.10", "2.500", "4.00×"):
        assert f" {cell} " in kd_row
    assert "closed 50.0% of the accuracy gap" in md
    assert "4.00× faster" in md
    assert "16.00× smaller" in md
    assert "![curves](curves.png)" in md
    assert "![accuracy_vs_latency](accuracy_vs_latency.png)" in md


def test_no_curves_no_curves_plot_and_nan_is_null(tmp_path: Path) -> None:
    entries = _entries(with_curves=False)
    entries[1].nll = float("nan")
    build_report(entries, tmp_path)
    assert not (tmp_path / "curves.png").exists()
    assert (tmp_path / "accuracy_vs_latency.png").exists()

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads((tmp_path / "report.json").read_text(), parse_constant=reject)
    assert data["models"][1]["nll"] is None
    assert "| – |" in (tmp_path / "report.md").read_text()


def test_summary_when_teacher_not_better_than_scratch() -> None:
    entries = _entries(with_curves=False)
    entries[1].accuracy = 0.95
    (row,) = summarize(entries)
    assert row["gap_closed"] is None


def test_model_report_validates_role() -> None:
    with pytest.raises(ValueError, match=r"role: got 'student'.*teacher, scratch, distilled"):
        ModelReport(role="student", name="x")


def test_from_measurements_picks_the_fields() -> None:
    row = ModelReport.from_measurements(
        "distilled",
        "kd",
        metrics={"accuracy": 0.8, "agreement": 0.9, "ece": 0.1, "nll": 0.5, "num_samples": 4},
        latency={"latency_ms_per_sample": 1.5, "latency_ms_per_batch": 3.0, "num_threads": 1},
        params=10,
        size_bytes=100,
        curves={"val/acc": [[0, 0.1], [1, 0.2]]},
    )
    assert (row.accuracy, row.agreement, row.ece, row.nll) == (0.8, 0.9, 0.1, 0.5)
    assert (row.latency_ms_per_sample, row.latency_ms_per_batch) == (1.5, 3.0)
    assert row.curves == {"val/acc": [(0, 0.1), (1, 0.2)]}


def test_load_report_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no report at"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text('{"title": "x"}')
    with pytest.raises(ValueError, match="no 'models' list"):
        load_report(tmp_path)


def test_render_table_and_print_report() -> None:
    table = render_table(_entries())
    assert table.row_count == 3
    assert [c.header for c in table.columns][:3] == ["Role", "Model", "Accuracy (%)"]
    console = Console(record=True, width=250)
    print_report(_entries(), console=console)
    text = console.export_text()
    assert "mlp-kd" in text and "92.50" in text and "4.00×" in text
    assert "closed 50.0% of the accuracy gap" in text


def test_build_report_failure_keeps_previous_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_report(_entries(), tmp_path, title="first")
    before = (tmp_path / "report.md").read_text()

    def broken_markdown(*args, **kwargs) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(report, "_markdown", broken_markdown)
    with pytest.raises(RuntimeError, match="boom"):
        build_report(_entries(), tmp_path, title="second")
    assert (tmp_path / "report.md").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
