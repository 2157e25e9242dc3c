"""Every distill method on digits with its own settings: one teacher, one run per method.

    python benchmarks/digits_methods.py [--seed 0] [--out benchmarks/digits_methods.md]

Trains the digits teacher once (`kdkit train model=teacher`), the scratch students
(`kdkit train model=student`), then `kdkit distill distill=<method>` for each method with the
settings of its own `distill/<method>.yaml` (the digits preset sets none). Logit and relation
methods distil the default mlp student; feature methods (fitnet, at, mse_hidden, cosine) need
conv features on both sides and distil student=small_cnn. Writes a markdown table: the
method, the student, the loss settings from the run's config.yaml, test accuracy, ECE, NLL
and the accuracy change against the same student trained from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from kdkit.atomic import atomic_write_text

FEATURE_METHODS = ("fitnet", "at", "mse_hidden", "cosine")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "src" / "kdkit" / "configs"
# distill keys that are not loss settings (or are the same for every method)
NOT_SETTINGS = {"method", "teacher_cache", "mixup_alpha", "exclude_first_and_last", "terms"}


def kdkit(*args: str) -> None:
    cmd = [sys.executable, "-m", "kdkit.cli", *args, "progress_bar=none", "threads=1"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def settings(run_dir: Path) -> str:
    distill = yaml.safe_load((run_dir / "config.yaml").read_text())["distill"]
    skip = NOT_SETTINGS | ({"ce_weight"} if distill["terms"].get("ce") is None else set())
    return ", ".join(f"{k}={v:g}" for k, v in distill.items() if k not in skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    args = parser.parse_args()
    methods = sorted(p.stem for p in (CONFIG_DIR / "distill").glob("*.yaml"))
    start = time.perf_counter()
    lines = []
    with tempfile.TemporaryDirectory(prefix="kdkit-methods-") as tmp:
        work = Path(tmp)
        seed = f"seed={args.seed}"
        kdkit("train", "model=teacher", seed, f"hydra.run.dir={work / 'teacher'}")
        teacher = work / "teacher" / "teacher"
        scratch = {}
        for student in ("mlp", "small_cnn"):
            kdkit("train", "model=student", f"student={student}", seed,
                  f"hydra.run.dir={work / student}")  # fmt: skip
            scratch[student] = metrics(work / student / "student" / "metrics.json")
        t = metrics(teacher / "metrics.json")
        lines += [
            f"- seed {args.seed}; {os.cpu_count()} CPUs, torch {torch.__version__}; digits "
            "preset (teacher small_cnn 20 epochs, students 40 epochs, Adam lr 0.01, batch 64)",
            f"- teacher small_cnn: {100 * t['accuracy']:.2f} %, ECE {t['ece']:.4f}; scratch mlp "
            f"{100 * scratch['mlp']['accuracy']:.2f} %, scratch small_cnn "
            f"{100 * scratch['small_cnn']['accuracy']:.2f} %",
            "",
            "| method | student | settings (distill.*) | accuracy (%) | vs scratch (pp) | ECE "
            "| NLL |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for method in methods:
            student = "small_cnn" if method in FEATURE_METHODS else "mlp"
            run_dir = work / method
            checkpoint = f"teacher.checkpoint={teacher / 'model.pt'}"
            kdkit("distill", f"distill={method}", f"student={student}", seed, checkpoint,
                  f"hydra.run.dir={run_dir}")  # fmt: skip
            m = metrics(run_dir / "distilled" / "metrics.json")
            gain = 100 * (m["accuracy"] - scratch[student]["accuracy"])
            lines.append(
                f"| {method} | {student} | {settings(run_dir)} | {100 * m['accuracy']:.2f} | "
                f"{gain:+.2f} | {m['ece']:.4f} | {m['nll']:.3f} |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"(wall time {time.perf_counter() - start:.0f} s)"]
    text = "# Every method on digits\n\n`python benchmarks/digits_methods.py`\n\n"
    atomic_write_text(args.out, text + "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
