"""`kdkit run` (digits) on 1 vs 2 intra-op threads, alone and beside one busy process.

    python benchmarks/threads.py [--repeats 1]

Prints a markdown table: wall time and test accuracies per setting. The busy process is
`python -c "while True: pass"`, started before and stopped after each run. The machine's load
average at the start is printed too: other work on the machine inflates every time alike.
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


def run(threads: int, busy: bool, work: Path) -> tuple[float, dict[str, float]]:
    run_dir = work / f"t{threads}_{'busy' if busy else 'alone'}_{time.time_ns()}"
    cmd = [sys.executable, "-m", "kdkit.cli", "run", f"threads={threads}", "progress_bar=none",
           f"hydra.run.dir={run_dir}"]  # fmt: skip
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    report = json.loads((run_dir / "report.json").read_text())
    return wall, {m["role"]: m["accuracy"] for m in report["models"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"- {os.cpu_count()} CPUs, torch {torch.__version__}, load average at start "
          f"{os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| threads | other busy process | wall (s) | teacher / scratch / distilled acc (%) |")
    print("|---:|---|---:|---|")
    with tempfile.TemporaryDirectory(prefix="kdkit-threads-") as tmp:
        for busy in (False, True):
            for threads in (1, 2):
                for _ in range(args.repeats):
                    wall, acc = run(threads, busy, Path(tmp))
                    accs = " / ".join(f"{100 * acc[r]:.2f}" for r in ("teacher", "scratch",
                                                                       "distilled"))  # fmt: skip
                    print(f"| {threads} | {'yes' if busy else 'no'} | {wall:.1f} | {accs} |",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
