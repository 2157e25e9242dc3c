"""The comparison a user reads at the end: teacher vs. scratch student vs. distilled student.

``build_report`` writes ``report.json`` (machine-readable, read back by :func:`load_report`),
``report.md`` (a table and a one-paragraph summary) and PNG plots; ``print_report`` shows the
same table in the terminal with rich. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdkit.atomic import atomic_write_bytes, atomic_write_text
from kdkit.evaluation import gap_closed

__all__ = [
    "ROLES",
    "ModelReport",
    "build_report",
    "load_report",
    "print_report",
    "render_table",
    "summarize",
]

ROLES = ("teacher", "scratch", "distilled")
REPORT_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelReport:
    """One row of the report: a model's measurements.

    ``accuracy`` and ``agreement`` are fractions in [0, 1]; ``agreement`` is top-1 agreement with
    the teacher. Latencies are CPU milliseconds (see :func:`kdkit.evaluation.measure_latency`).
    ``speedup_vs_teacher`` is ``teacher latency per sample / this model's``; ``build_report``
    fills it when it is ``None`` and a teacher row has a latency. ``curves`` maps a metric name
    (e.g. ``"val/acc"``) to ``[(step_or_epoch, value), ...]``.
    """

    role: str
    name: str
    accuracy: float | None = None
    agreement: float | None = None
    ece: float | None = None
    nll: float | None = None
    params: int | None = None
    size_bytes: int | None = None
    latency_ms_per_sample: float | None = None
    latency_ms_per_batch: float | None = None
    speedup_vs_teacher: float | None = None
    curves: dict[str, list[tuple[float, float]]] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(
                f"ModelReport.role: got {self.role!r} for model {self.name!r}; expected one of "
                f"{', '.join(ROLES)}."
            )

    @classmethod
    def from_measurements(
        cls,
        role: str,
        name: str,
        *,
        metrics: Mapping[str, Any] | None = None,
        latency: Mapping[str, Any] | None = None,
        params: int | None = None,
        size_bytes: int | None = None,
        curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    ) -> ModelReport:
        """Build a row from the dicts of ``evaluate`` and ``measure_latency``."""
        metrics = metrics or {}
        latency = latency or {}
        return cls(
            role=role,
            name=name,
            accuracy=metrics.get("accuracy"),
            agreement=metrics.get("agreement"),
            ece=metrics.get("ece"),
            nll=metrics.get("nll"),
            params=params,
            size_bytes=size_bytes,
            latency_ms_per_sample=latency.get("latency_ms_per_sample"),
            latency_ms_per_batch=latency.get("latency_ms_per_batch"),
            curves=_normalize_curves(curves),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.curves is not None:
            data["curves"] = {k: [[s, v] for s, v in pts] for k, pts in self.curves.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelReport:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"ModelReport entry {data.get('name')!r}: unknown keys {sorted(unknown)}; "
                f"allowed keys are {sorted(known)}. Fix: was the report written by a newer kdkit?"
            )
        kwargs = dict(data)
        kwargs["curves"] = _normalize_curves(kwargs.get("curves"))
        return cls(**kwargs)


def _normalize_curves(
    curves: Mapping[str, Sequence[Sequence[float]]] | None,
) -> dict[str, list[tuple[float, float]]] | None:
    if curves is None:
        return None
    out: dict[str, list[tuple[float, float]]] = {}
    for metric, points in curves.items():
        pts = []
        for point in points:
            if len(point) != 2:
                raise ValueError(
                    f"curves[{metric!r}]: got point {point!r}; expected (step_or_epoch, value)."
                )
            pts.append((point[0], point[1]))
        out[str(metric)] = pts
    return out


def _first(entries: Sequence[ModelReport], role: str) -> ModelReport | None:
    return next((e for e in entries if e.role == role), None)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _with_speedups(entries: Sequence[ModelReport]) -> list[ModelReport]:
    teacher = _first(entries, "teacher")
    base = teacher.latency_ms_per_sample if teacher else None
    return [
        e
        if e.speedup_vs_teacher is not None
        else dataclasses.replace(e, speedup_vs_teacher=_ratio(base, e.latency_ms_per_sample))
        for e in entries
    ]


def summarize(entries: Sequence[ModelReport]) -> list[dict[str, Any]]:
    """Per distilled model: gap closed, speed-up and size ratio against the teacher.

    ``gap_closed`` is :func:`kdkit.evaluation.gap_closed` (``None`` when there is no scratch
    row or the teacher is not better than scratch). ``size_ratio`` is teacher size / student
    size (bytes on disk, else parameter count).
    """
    teacher = _first(entries, "teacher")
    scratch = _first(entries, "scratch")
    rows = []
    for e in entries:
        if e.role != "distilled":
            continue
        size_ratio = None
        if teacher is not None:
            size_ratio = _ratio(teacher.size_bytes, e.size_bytes)
            if size_ratio is None:
                size_ratio = _ratio(teacher.params, e.params)
        speedup = e.speedup_vs_teacher
        if speedup is None and teacher is not None:
            speedup = _ratio(teacher.latency_ms_per_sample, e.latency_ms_per_sample)
        rows.append(
            {
                "name": e.name,
                "gap_closed": gap_closed(
                    teacher.accuracy if teacher else None,
                    scratch.accuracy if scratch else None,
                    e.accuracy,
                ),
                "speedup_vs_teacher": speedup,
                "size_ratio": size_ratio,
                "teacher": teacher.name if teacher else None,
                "scratch": scratch.name if scratch else None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

_COLUMNS = (
    "Role",
    "Model",
    "Accuracy (%)",
    "Agreement (%)",
    "ECE",
    "NLL",
    "Params",
    "Size (MB)",
    "Latency/sample (ms)",
    "Latency/batch (ms)",
    "Speed-up",
)


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value * scale:{spec}}{suffix}"


def _row(e: ModelReport) -> list[str]:
    return [
        e.role,
        e.name,
        _fmt(e.accuracy, ".2f", 100.0),
        _fmt(e.agreement, ".2f", 100.0),
        _fmt(e.ece, ".4f"),
        _fmt(e.nll, ".4f"),
        f"{int(e.params):,d}" if e.params is not None else "–",
        _fmt(e.size_bytes, ".2f", 1e-6),
        _fmt(e.latency_ms_per_sample, ".3f"),
        _fmt(e.latency_ms_per_batch, ".3f"),
        _fmt(e.speedup_vs_teacher, ".2f", suffix="×"),
    ]


def _summary_sentences(entries: Sequence[ModelReport]) -> list[str]:
    sentences = []
    for row in summarize(entries):
        parts = []
        gap = row["gap_closed"]
        if gap is not None:
            parts.append(
                f"closed {gap * 100:.1f}% of the accuracy gap between {row['scratch']} "
                f"(trained from scratch) and the teacher {row['teacher']}"
            )
        elif row["teacher"] and row["scratch"]:
            parts.append(
                "has no gap to close (the teacher is not more accurate than the scratch student)"
            )
        if row["speedup_vs_teacher"] is not None:
            parts.append(f"runs {row['speedup_vs_teacher']:.2f}× faster than the teacher on CPU")
        if row["size_ratio"] is not None:
            parts.append(f"is {row['size_ratio']:.2f}× smaller")
        if parts:
            body = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
            sentences.append(f"Distilled student {row['name']} {body}.")
    return sentences


def render_table(entries: Sequence[ModelReport], title: str | None = None) -> Table:
    """The report as a rich table (same columns as ``report.md``)."""
    table = Table(title=title)
    for i, column in enumerate(_COLUMNS):
        table.add_column(column, justify="left" if i < 2 else "right")
    for e in _with_speedups(entries):
        table.add_row(*_row(e))
    return table


def print_report(
    entries: Sequence[ModelReport], console: Console | None = None, title: str | None = None
) -> None:
    """Print the table and the summary to the terminal."""
    # Piped output (CI logs, `| tee`) gets a width that fits all columns instead of rich's 80.
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    console.print(render_table(entries, title=title))
    for sentence in _summary_sentences(entries):
        console.print(sentence)


def _markdown(
    entries: Sequence[ModelReport],
    title: str,
    plots: Sequence[str],
    sources: Sequence[str] = (),
) -> str:
    lines = [f"# {title}", ""]
    lines.append("| " + " | ".join(_COLUMNS) + " |")
    lines.append("|" + "|".join([":---"] * 2 + ["---:"] * (len(_COLUMNS) - 2)) + "|")
    for e in entries:
        cells = [c.replace("|", "\\|") for c in _row(e)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    sentences = _summary_sentences(entries)
    if sentences:
        lines.extend(sentences)
        lines.append("")
    lines.append(
        "Accuracy and agreement (top-1 agreement with the teacher) in %, ECE over equal-width "
        "confidence bins (L1), "
        "latency is the median CPU time in milliseconds; speed-up is per sample, against the "
        "teacher."
    )
    lines.append("")
    if sources:
        lines.append("Runs compared:")
        lines.append("")
        lines.extend(f"- {source}" for source in sources)
        lines.append("")
    for plot in plots:
        lines.append(f"![{Path(plot).stem}]({plot})")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]) -> Any:
    # Figure + Agg canvas directly, not pyplot: no global state, no GUI backend, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: Path) -> bool:
    """Write ``fig`` to ``path``; False (nothing written) when there is no figure."""
    if fig is None:
        return False
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return True


# Curves of fractions in [0, 1], drawn in % like the table.
_PERCENT_CURVES = ("val/acc", "val/agreement", "train/acc", "test/acc")


def _curves_figure(entries: Sequence[ModelReport]) -> Any:
    """One panel per metric; accuracy-like metrics in %, like the table. None: no curves."""
    metrics: list[str] = []
    for e in entries:
        for metric in e.curves or {}:
            if metric not in metrics:
                metrics.append(metric)
    if not metrics:
        return None
    fig = _new_figure((5.0 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        scale = 100.0 if metric in _PERCENT_CURVES else 1.0
        for e in entries:
            points = (e.curves or {}).get(metric)
            if points:
                xs, ys = zip(*points, strict=True)
                ys = [y * scale for y in ys]
                ax.plot(xs, ys, marker="o", markersize=3, label=f"{e.name} ({e.role})")
        ax.set_title(f"{metric} (%)" if scale != 1.0 else metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _accuracy_vs_latency_figure(entries: Sequence[ModelReport]) -> Any:
    """One marker per model with accuracy and latency; None when there is none."""
    points = [e for e in entries if e.accuracy is not None and e.latency_ms_per_sample is not None]
    if not points:
        return None
    max_params = max((e.params or 0) for e in points) or 1
    colors = {"teacher": "tab:red", "scratch": "tab:gray", "distilled": "tab:blue"}
    fig = _new_figure((6.0, 4.5))
    ax = fig.subplots()
    for e in points:
        # Area proportional to parameter count; a floor keeps tiny models visible.
        size = max(30.0, 1500.0 * (e.params or 0) / max_params)
        ax.scatter(
            e.latency_ms_per_sample,
            e.accuracy * 100.0,
            s=size,
            alpha=0.6,
            color=colors[e.role],
            edgecolors="black",
        )
        label = e.name if e.params is None else f"{e.name} ({e.params:,} params)"
        ax.annotate(
            label,
            (e.latency_ms_per_sample, e.accuracy * 100.0),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize="small",
        )
    for role in [r for r in colors if any(e.role == r for e in points)]:
        ax.scatter([], [], color=colors[role], label=role, alpha=0.6)
    ax.set_xlabel("CPU latency per sample (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs. latency (marker area ∝ parameters)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    ax.margins(x=0.2)
    # At least 2 points of accuracy around the markers (one model alone would otherwise get
    # a range of hundredths of a percent), never past 100 %.
    accuracies = [e.accuracy * 100.0 for e in points]
    pad = max(1.0, 0.2 * (max(accuracies) - min(accuracies)))
    ax.set_ylim(max(0.0, min(accuracies) - pad), min(100.5, max(accuracies) + pad))
    return fig


# ---------------------------------------------------------------------------------------------
# Build / load
# ---------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    # NaN/inf are not JSON; store them as null so any JSON reader can load the report.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _kdkit_version() -> str | None:
    try:
        return importlib.metadata.version("kdkit")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_report(
    entries: Sequence[ModelReport],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "kdkit report",
    config: Mapping[str, Any] | None = None,
    sources: Sequence[str] = (),
) -> Path:
    """Write ``report.json``, ``report.md``, ``curves.png`` and ``accuracy_vs_latency.png``.

    ``sources`` (e.g. the run folders of a combined report) are listed under the table.

    ``curves.png`` is written only when some entry has ``curves``; ``accuracy_vs_latency.png``
    only when some entry has both accuracy and latency. Missing speed-ups are filled from the
    teacher row. ``config`` (e.g. the resolved Hydra config as a dict) is stored in
    ``report.json``. Returns ``out_dir``.
    """
    if not entries:
        raise ValueError(
            "build_report: got no entries; expected at least one ModelReport "
            "(teacher, scratch and/or distilled)."
        )
    for e in entries:
        if not isinstance(e, ModelReport):
            raise TypeError(f"build_report entries: got {type(e).__name__}; expected ModelReport.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _with_speedups(entries)

    plots = []
    if _save_png(_curves_figure(rows), out / "curves.png"):
        plots.append("curves.png")
    if _save_png(_accuracy_vs_latency_figure(rows), out / "accuracy_vs_latency.png"):
        plots.append("accuracy_vs_latency.png")

    payload = {
        "format_version": REPORT_FORMAT_VERSION,
        "title": title,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kdkit_version": _kdkit_version(),
        "config": dict(config) if config is not None else None,
        "summary": summarize(rows),
        "models": [e.to_dict() for e in rows],
        "plots": plots,
        "sources": list(sources),
    }
    text = json.dumps(_json_safe(payload), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write_text(out / "report.json", text + "\n")
    atomic_write_text(out / "report.md", _markdown(rows, title, plots, sources))
    return out


def load_report(path: str | os.PathLike[str]) -> list[ModelReport]:
    """Read the entries of a ``report.json`` (or of a directory that holds one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"load_report: no report at {p}; expected a report.json written by "
            "kdkit.report.build_report, or the directory that holds it."
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_report: {p} is not valid JSON ({exc}).") from exc
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), list):
        raise ValueError(
            f"load_report: {p} has no 'models' list; expected the report.json format of "
            "kdkit.report.build_report."
        )
    return [ModelReport.from_dict(m) for m in data["models"]]
