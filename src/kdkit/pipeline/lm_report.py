"""The language-model report: teacher vs. scratch student vs. distilled student on held-out text.

``report.json`` (every number, the corpus sha256 and Python version, the config) and
``report.md`` (a table, the summary, what the columns mean), both written atomically;
:func:`print_lm_report` shows the same table in the terminal with rich.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdkit.atomic import atomic_write_text
from kdkit.report import ROLES, _fmt, _json_safe

__all__ = [
    "LMRow",
    "bits_per_character",
    "build_lm_report",
    "load_lm_report",
    "print_lm_report",
    "with_speedups",
]

LM_REPORT_FORMAT = "kdkit-lm-report"


def bits_per_character(total_nats: float, characters: int) -> float:
    """``total_nats / characters / ln 2``: the text's code length per character, which compares
    models whatever their tokenizer (with one token per character it is ``log2`` of the
    perplexity)."""
    return total_nats / characters / math.log(2)


@dataclass
class LMRow:
    """One model's measurements. ``nll`` are nats per token over every kept token of the split,
    ``ppl = exp(nll)``, ``bpc`` bits per character; ``agreement`` is the fraction of test tokens
    where the model's top-1 next token is the teacher's; ``tokens_per_s`` is CPU inference
    throughput (one thread, a batch of blocks); ``speedup_vs_teacher`` is the ratio of
    throughputs; ``init_sha256`` is the hash of the weights the model started from (the scratch
    and distilled students share it); ``train_s`` is the stage's wall time."""

    role: str
    name: str
    params: int
    size_bytes: int
    val_nll: float
    val_ppl: float
    val_bpc: float
    test_nll: float
    test_ppl: float
    test_bpc: float
    test_tokens: int
    test_characters: int
    agreement: float | None = None
    tokens_per_s: float | None = None
    speedup_vs_teacher: float | None = None
    init_sha256: str | None = None
    train_s: float | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(
                f"LMRow.role: got {self.role!r} for model {self.name!r}; expected one of "
                f"{', '.join(ROLES)}."
            )


_COLUMNS = (
    "Role",
    "Model",
    "Val ppl",
    "Test ppl",
    "Test bits/char",
    "Agreement (%)",
    "Params",
    "Size (MB)",
    "Tokens/s (CPU)",
    "Speed-up",
)


def _cells(row: LMRow) -> list[str]:
    return [
        row.role,
        row.name,
        _fmt(row.val_ppl, ".3f"),
        _fmt(row.test_ppl, ".3f"),
        _fmt(row.test_bpc, ".4f"),
        _fmt(row.agreement, ".2f", 100.0),
        f"{row.params:,d}",
        _fmt(row.size_bytes, ".2f", 1e-6),
        _fmt(row.tokens_per_s, ",.0f"),
        _fmt(row.speedup_vs_teacher, ".2f", suffix="×"),
    ]


def _summary(rows: Sequence[LMRow]) -> list[str]:
    by_role = {r.role: r for r in rows}
    teacher, scratch, distilled = (by_role.get(r) for r in ROLES)
    if scratch is None or distilled is None:
        return []
    verdict = "beats" if distilled.test_ppl < scratch.test_ppl else "does not beat"
    text = (
        f"The distilled student {verdict} the one trained from scratch with the same init, "
        f"batches and budget: test perplexity {distilled.test_ppl:.3f} vs {scratch.test_ppl:.3f}"
        f" ({distilled.test_bpc:.4f} vs {scratch.test_bpc:.4f} bits/char)"
    )
    if teacher is not None:
        text += f"; the teacher has {teacher.test_ppl:.3f}"
        if distilled.speedup_vs_teacher is not None:
            speed = distilled.speedup_vs_teacher
            text += f", and the student has {speed:.2f}× the teacher's CPU tokens/s"
    return [text + "."]


def with_speedups(rows: Sequence[LMRow]) -> list[LMRow]:
    """The rows with ``speedup_vs_teacher`` (tokens/s against the teacher's) filled in."""
    teacher = next((r for r in rows if r.role == "teacher"), None)
    base = teacher.tokens_per_s if teacher is not None else None
    return [
        dataclasses.replace(r, speedup_vs_teacher=r.tokens_per_s / base)
        if base and r.tokens_per_s and r.speedup_vs_teacher is None
        else r
        for r in rows
    ]


def render_lm_table(rows: Sequence[LMRow], title: str | None = None) -> Table:
    table = Table(title=title)
    for i, column in enumerate(_COLUMNS):
        table.add_column(column, justify="left" if i < 2 else "right")
    for row in with_speedups(rows):
        table.add_row(*_cells(row))
    return table


def print_lm_report(rows: Sequence[LMRow], title: str | None = None) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(render_lm_table(rows, title))
    for sentence in _summary(with_speedups(rows)):
        console.print(sentence)


def _markdown(rows: Sequence[LMRow], title: str, data: Mapping[str, Any]) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(_COLUMNS) + " |"]
    lines.append("|" + "|".join([":---"] * 2 + ["---:"] * (len(_COLUMNS) - 2)) + "|")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    lines += ["", *_summary(rows), ""]
    test = rows[0]
    lines.append(
        f"Held-out text: {test.test_tokens:,d} test tokens ({test.test_characters:,d} "
        f"characters) of the Python {data.get('python_version')} standard library source, "
        f"corpus sha256 `{data.get('sha256')}` (other Python versions have other contents: "
        f"compare results at the same sha256); {data.get('tokenizer')} tokenizer, vocabulary "
        f"{data.get('vocab_size')}, blocks of {data.get('block_size')} tokens. Perplexity is "
        "exp(mean nats per token); bits/char = total nats / characters / ln 2; agreement = "
        "share of test tokens whose top-1 next token is the teacher's; tokens/s = CPU "
        "inference throughput on one thread; speed-up = tokens/s against the teacher's."
    )
    return "\n".join(lines) + "\n"


def build_lm_report(
    rows: Sequence[LMRow],
    out_dir: str | Path,
    *,
    title: str,
    data: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; speed-ups are filled from the
    teacher row. ``data`` is the data module's ``describe()`` (corpus sha256, Python version,
    tokenizer). Returns ``out_dir``."""
    if not rows:
        raise ValueError("build_lm_report: got no rows; expected teacher, scratch and distilled.")
    rows = with_speedups(rows)
    out = Path(out_dir)
    payload = {
        "format": LM_REPORT_FORMAT,
        "title": title,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python_version": platform.python_version(),
        "data": dict(data),
        "models": [dataclasses.asdict(r) for r in rows],
        "config": dict(config) if config is not None else None,
    }
    text = json.dumps(_json_safe(payload), indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write_text(out / "report.json", text + "\n")
    atomic_write_text(out / "report.md", _markdown(rows, title, data))
    return out


def load_lm_report(path: str | Path) -> tuple[list[LMRow], dict[str, Any]]:
    """The rows and the whole payload of an LM ``report.json`` (or of the folder holding it)."""
    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    data = json.loads(p.read_text(encoding="utf-8"))
    if data.get("format") != LM_REPORT_FORMAT:
        raise ValueError(
            f"load_lm_report: {p} is not a language-model report (format "
            f"{data.get('format')!r}, expected {LM_REPORT_FORMAT!r}); it was written by another "
            "kdkit pipeline — read it with kdkit.report.load_report."
        )
    return [LMRow(**row) for row in data["models"]], data
