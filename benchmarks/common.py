"""Shared helpers of the kdkit benchmarks: modes, interleaved timing, robust summaries.

Every comparison is measured side by side in one process: the variants take turns, one
repetition each, in a fixed rotating order (so slow drift of the machine — thermal, other
processes — hits every variant alike), and a ratio is the median of the per-repetition ratios.
Absolute times are reported for context, never asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import itertools
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdkit.atomic import atomic_write_text

MODES = ("smoke", "quick", "full")


def add_mode_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--quick`` / ``--smoke`` (default: full), ``--json PATH``, ``--threads N``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="shorter run (minutes)")
    group.add_argument("--smoke", action="store_true", help="tiny run (seconds), for tests")
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: all cores)"
    )
    return parser


def seed_runs_parser(doc: str, script: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark that runs `kdkit run` once per seed: ``--seeds``, ``--out``
    (the script's ``.md`` beside it by default) and extra Hydra overrides."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(Path(script).with_suffix(".md")))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for `kdkit run`")
    return parser


def mode_of(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def pick(mode: str, smoke: Any, quick: Any, full: Any) -> Any:
    """The setting for ``mode``."""
    if mode not in MODES:
        raise ValueError(f"benchmark mode must be one of {MODES}, got {mode!r}")
    return {"smoke": smoke, "quick": quick, "full": full}[mode]


def set_threads(threads: int | None) -> int:
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


ALLOCATOR_DEFAULT = "default (glibc malloc trims freed memory and mmaps large blocks)"


def add_allocator_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="keep malloc's defaults (page faults of re-faulted memory add noise to step times)",
    )
    return parser


def fix_allocator(default: bool = False) -> str:
    """Keep freed memory in this process: glibc malloc's trim and mmap thresholds set to 1 GiB.

    By default glibc returns a freed large block to the OS (mmap'ed blocks, the trimmed heap
    top), so the next step page-faults it back in: on a CPU training step of these sizes that is
    ~20% of the time, and how much depends on which tensors happen to outlive a step (a loop
    keeping the last step's features trims less). Step-time ratios then measure the allocator's
    luck; with the thresholds fixed they measure the step. Returns what this process uses.
    """
    if default:
        return ALLOCATOR_DEFAULT
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return ALLOCATOR_DEFAULT.replace("glibc", "not glibc:")
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if mallopt(m_mmap_threshold, 1 << 30) != 1 or mallopt(m_trim_threshold, 1 << 30) != 1:
        return ALLOCATOR_DEFAULT + "; mallopt refused the fixed thresholds"
    return "glibc malloc, trim and mmap thresholds fixed at 1 GiB (mallopt): freed memory is reused"


def cycling(step: Callable[[Any], object], batches: Sequence[Any]) -> Callable[[], None]:
    """A call without arguments that runs ``step`` on the next of ``batches`` (round robin)."""
    batch = itertools.cycle(batches)

    def go() -> None:
        step(next(batch))

    return go


def interleaved(
    variants: Mapping[str, Callable[[], None]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant; calls alternate A B C, B C A, C A B, ...

    ``warmup`` rounds are run and discarded first (allocator, caches, lazy init).
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and max of ``values``."""
    vals = sorted(float(v) for v in values)
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {
        "median": statistics.median(vals),
        "q1": q1,
        "q3": q3,
        "min": vals[0],
        "max": vals[-1],
        "n": len(vals),
    }


def paired_ratio(numer: Sequence[float], denom: Sequence[float]) -> dict[str, float]:
    """Summary of the per-repetition ratios ``numer[i] / denom[i]`` (paired: same round)."""
    if len(numer) != len(denom) or not numer:
        raise ValueError(
            f"paired_ratio needs two equally long, non-empty series, got {len(numer)} and "
            f"{len(denom)}"
        )
    return summary([a / b for a, b in zip(numer, denom, strict=True)])


def floor_ratio(numer: Sequence[float], denom: Sequence[float]) -> dict[str, float]:
    """Ratios of the two series' minima and of their first quartiles.

    On a machine shared with other work, the fastest repetitions are the ones least disturbed,
    so these are a second, load-robust estimate next to the median of paired ratios.
    """
    a, b = summary(numer), summary(denom)
    return {"min": a["min"] / b["min"], "q1": a["q1"] / b["q1"]}


def fmt_ratio(stats: Mapping[str, float]) -> str:
    return f"{stats['median']:.3f} (IQR {stats['q1']:.3f}-{stats['q3']:.3f}, n={stats['n']})"


def fmt_ms(stats: Mapping[str, float]) -> str:
    return f"{1e3 * stats['median']:.2f} ms (IQR {1e3 * stats['q1']:.2f}-{1e3 * stats['q3']:.2f})"


def peak_rss_mib() -> float:
    """This process's peak resident set size (``getrusage`` ru_maxrss; KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Current resident set size from /proc (Linux); NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def finite_numbers(obj: Any) -> list[float]:
    """Every int/float in a nested result (bools and strings skipped), for sanity checks."""
    out: list[float] = []
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return out
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, Mapping):
        for v in obj.values():
            out.extend(finite_numbers(v))
    elif isinstance(obj, list | tuple):
        for v in obj:
            out.extend(finite_numbers(v))
    return out


def write_json(result: Mapping[str, Any], path: Path | None) -> None:
    """Print ``result`` as JSON; also write it atomically to ``path`` when given."""
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    print(text)
    if path is not None:
        atomic_write_text(path, text + "\n")


def distiller_speed_options() -> set[str]:
    """Which of the Distiller's speed keywords this kdkit has (they are being added)."""
    import inspect

    from kdkit import Distiller

    params = inspect.signature(Distiller.__init__).parameters
    return {k for k in ("autocast_dtype", "channels_last", "compile") if k in params}
