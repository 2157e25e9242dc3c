"""Off-policy token KD vs sequence-level KD vs on-policy GKD on the LM preset (issue 10, item 4).

    python benchmarks/lm_recipes.py [--seeds 0] [--out benchmarks/lm_recipes.md] [OVERRIDES...]

Per seed: `kdkit run experiment=lm distill=token_kd` (trains the teacher, the scratch student
and the off-policy distilled student), then `distill=seqkd` and `distill=gkd` with the same
teacher (`teacher.checkpoint=<first run>/teacher/model.pt`). Every distilled student starts from
the scratch student's weights and takes the same number of optimizer steps on the same data
blocks; what differs is what a step trains on (the block itself, the teacher's continuation of
its prompt, or the student's own sample with probability lmbda) and so what a step costs: the
distillation stage's wall time (`train_s` of the report) is the compute each recipe spends.
The markdown file gives the command, date, machine and load, and per recipe test perplexity,
bits/char, top-1 agreement with the teacher and that time (mean ± std over seeds).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import seed_runs_parser

from kdkit.atomic import atomic_write_text

METHODS = ("token_kd", "seqkd", "gkd")
LABELS = {
    "scratch": "scratch (no teacher)",
    "token_kd": "off-policy token KD (`distill=token_kd`)",
    "seqkd": "sequence-level KD (`distill=seqkd`)",
    "gkd": "on-policy GKD (`distill=gkd`, lmbda 0.5)",
}
# (report key, column title, format, scale)
METRICS = (
    ("test_ppl", "test perplexity", ".3f", 1.0),
    ("test_bpc", "test bits/char", ".4f", 1.0),
    ("agreement", "top-1 agreement (%)", ".2f", 100.0),
    ("train_s", "stage wall time (s)", ".1f", 1.0),
)


def run(method: str, seed: int, work: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """One `kdkit run experiment=lm distill=<method> seed=<seed>`: its report's rows by role."""
    run_dir = work / f"{method}_{seed}"
    teacher = work / f"{METHODS[0]}_{seed}" / "teacher" / "model.pt"
    extra = [] if method == METHODS[0] else [f"teacher.checkpoint={teacher}"]
    cmd = [sys.executable, "-m", "kdkit.cli", "run", "experiment=lm", f"distill={method}",
           f"seed={seed}", f"hydra.run.dir={run_dir}", "progress_bar=none", *extra,
           *overrides]  # fmt: skip
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} seed {seed} failed:\n{done.stderr[-4000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    return {m["role"]: m for m in report["models"]}


def _cell(values: Sequence[float | None], spec: str, scale: float) -> str:
    if any(v is None for v in values):
        return "–"
    scaled = [float(v) * scale for v in values]  # type: ignore[arg-type]
    std = statistics.stdev(scaled) if len(scaled) > 1 else 0.0
    return f"{statistics.fmean(scaled):{spec}} ± {std:{spec}}"


def render(
    rows: dict[str, list[dict[str, Any]]], seeds: Sequence[int], overrides: Sequence[str],
    loads: tuple[float, float],
) -> str:  # fmt: skip
    """The markdown page: one line per recipe (and the scratch student), mean ± std."""
    command = " ".join(["kdkit run experiment=lm distill=<method> seed=<seed>", *overrides])
    lines = [
        "# Off-policy vs sequence-level vs on-policy distillation (LM preset)",
        "",
        f"Command: `python benchmarks/lm_recipes.py --seeds {' '.join(map(str, seeds))}"
        f"{' ' + ' '.join(overrides) if overrides else ''}`, i.e. per seed `{command}` for "
        f"{', '.join(METHODS)} (the latter two with the first run's teacher, "
        "`teacher.checkpoint=`).  ",
        f"Generated on {time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {os.cpu_count()} CPU "
        f"cores ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}, no GPU. Load average (1 min) "
        f"{loads[0]:.2f} at the start, {loads[1]:.2f} at the end (a shared machine: wall times "
        "are those of a busy one, compare them with each other).",
        "",
        "Same student init, same data blocks, same number of optimizer steps for every row. "
        "seqkd and gkd keep each block's first 64 tokens as the prompt and learn 64 tokens per "
        "row (the teacher's greedy continuation; or the student's sample at T = 1 with "
        "probability 0.5, else the block's own next 64 tokens), token_kd learns all 128.",
        "",
        "| recipe | " + " | ".join(title for _, title, _, _ in METRICS) + " |",
        "|:---|" + "---:|" * len(METRICS),
    ]
    for name, runs in rows.items():
        cells = [_cell([r.get(key) for r in runs], spec, scale) for key, _, spec, scale in METRICS]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = seed_runs_parser(__doc__, __file__)
    parser.set_defaults(seeds=[0])  # three recipes per seed: one seed by default
    args = parser.parse_args(argv)
    start_load = os.getloadavg()[0]
    rows: dict[str, list[dict[str, Any]]] = {"scratch": [], **{m: [] for m in METHODS}}
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-recipes-") as tmp:
        for seed in args.seeds:
            for method in METHODS:  # token_kd first: it trains the teacher the others load
                roles = run(method, seed, Path(tmp), args.overrides)
                if method == METHODS[0]:
                    rows["scratch"].append(roles["scratch"])
                rows[method].append(roles["distilled"])
                d = roles["distilled"]
                print(f"seed {seed} {method}: test ppl {d['test_ppl']:.3f}, {d['train_s']:.0f} s")
    text = render(rows, args.seeds, args.overrides, (start_load, os.getloadavg()[0]))
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
