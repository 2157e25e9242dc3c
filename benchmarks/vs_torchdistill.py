"""kdkit against torchdistill on the same KD step: step time and peak memory.

torchdistill is not a kdkit dependency and is never imported by kdkit. It lives in its own
environment, e.g.::

    python3 -m venv /tmp/tdvenv
    /tmp/tdvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        torchdistill rich lightning-utilities

This script (run from kdkit's venv) looks for a Python that can import torchdistill: the current
one, ``--td-python``, ``$KDKIT_TD_PYTHON``, or ``/tmp/tdvenv/bin/python``; without one it
records a skip with the reason. kdkit is put on that Python's path (``PYTHONPATH=src``), so both
frameworks run in the same interpreter with the same torch:

* time: ONE worker process (keeping freed memory, as ``overhead.py`` explains; not with
  ``--default-allocator``) runs both step functions, alternating step by step (ratio = median
  of the per-pair ratios kdkit / torchdistill), and counts the torch ops of a step of each
  (torch.profiler; deterministic, so a load-free measure next to the load-sensitive times);
* memory: one fresh worker process per framework runs the same steps and reports its peak
  resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) and the peak minus the RSS after
  setup (models built, framework imported) — the training increment.

The same KD on both sides: ``0.5 * CE(y, z_s) + 0.5 * T^2 * KL(p_t || p_s)``, T = 4, batchmean:
torchdistill's ``DistillationBox`` with a ``WeightedSumLoss`` holding its ``KDLoss(alpha=0.5)``
on the models' outputs (``forward_process`` + ``post_forward_process``: backward, SGD step,
``zero_grad()``); kdkit's ``Distiller(student, teacher, [Term(CrossEntropyLoss(), 0.5),
Term(KLDivLoss(4), 0.5)])`` in the same loop (backward, step, then ``zero_grad``: called between
forward and backward instead, it alone cost kdkit's step ~50 us here).
torchdistill's box does not put the teacher in eval mode itself; the worker does (once), as
kdkit does on every forward. A third variant, kdkit with ``check_finite=False``, runs in the
same rotation: what kdkit's one default guarantee that torchdistill lacks (the loss read for
NaN/Inf every CPU step) costs.

    python benchmarks/vs_torchdistill.py [--quick | --smoke] [--td-python PATH]
                                         [--default-allocator] [--batch N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    add_allocator_arg,
    add_mode_args,
    current_rss_mib,
    cycling,
    fix_allocator,
    floor_ratio,
    fmt_ms,
    fmt_ratio,
    interleaved,
    mode_of,
    paired_ratio,
    peak_rss_mib,
    pick,
    set_threads,
    summary,
    write_json,
)

TEMPERATURE = 4.0
ALPHA = 0.5
INSTALL_HINT = (
    "python3 -m venv /tmp/tdvenv && /tmp/tdvenv/bin/pip install torch==2.14.1 "
    "torchvision==0.29.1 torchdistill rich lightning-utilities"  # both imported by kdkit
)


# ---------------------------------------------------------------------------- worker side
def _config(mode: str, batch: int | None = None) -> dict[str, Any]:
    return {
        "batch": batch or pick(mode, 16, 64, 64),
        "size": pick(mode, 8, 16, 16),
        "teacher_width": pick(mode, 8, 32, 32),
        "student_width": pick(mode, 4, 16, 16),
        "repeats": pick(mode, 4, 100, 1500),
        "phase_repeats": pick(mode, 4, 100, 1000),
        "memory_steps": pick(mode, 3, 20, 40),
    }


def _models(cfg: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    import torch

    from kdkit.models import create_model

    torch.manual_seed(0)
    teacher = create_model("small_cnn", 10, width=cfg["teacher_width"]).eval()
    student = create_model("small_cnn", 10, width=cfg["student_width"])
    b, s = cfg["batch"], cfg["size"]
    batches = [(torch.randn(b, 3, s, s), torch.randint(0, 10, (b,))) for _ in range(4)]
    return teacher, student, batches


def _kdkit_step(teacher: Any, student: Any, check_finite: bool = True) -> Any:
    import torch

    from kdkit import Distiller, Term
    from kdkit.losses import CrossEntropyLoss, KLDivLoss

    distiller = Distiller(
        student,
        teacher,
        [
            Term(CrossEntropyLoss(), ALPHA, teacher=None, target=True),
            Term(KLDivLoss(TEMPERATURE), 1.0 - ALPHA),
        ],
        check_finite=check_finite,
    ).train()
    opt = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)

    def step(x: Any, y: Any) -> float:
        # the loop of torchdistill's post_forward_process: backward, step, then zero_grad
        out = distiller(x, y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    step.phases = {  # type: ignore[attr-defined]  (see phase_times)
        "teacher": (distiller, "teacher_outputs"),
        "student": (distiller.student, "forward"),
        "loss": (distiller, "compute_loss"),
        "forward": (distiller, "forward"),
    }
    return step


def _torchdistill_step(teacher: Any, student: Any) -> Any:
    import logging

    import torch
    from torchdistill.core.distillation import DistillationBox

    logging.getLogger("torchdistill").setLevel(logging.WARNING)
    kd = {
        "key": "KDLoss",
        "kwargs": {
            "student_module_path": ".",
            "student_module_io": "output",
            "teacher_module_path": ".",
            "teacher_module_io": "output",
            "temperature": TEMPERATURE,
            "alpha": ALPHA,
            "reduction": "batchmean",
        },
    }
    train_config = {
        "num_epochs": 1,
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.01, "momentum": 0.9}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}},
        },
    }
    teacher.eval()
    box = DistillationBox(teacher, student, {}, train_config, torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)

    def step(x: Any, y: Any) -> float:
        loss = box.forward_process(x, y, {})
        box.post_forward_process(loss)
        return loss.detach()

    step.phases = {  # type: ignore[attr-defined]  (see phase_times)
        "teacher": (box, "get_teacher_output"),
        "student": (box.student_model, "forward"),
        "loss": (box, "criterion"),
        "forward": (box, "forward_process"),
    }

    return step


VARIANTS = ("kdkit", "torchdistill", "kdkit_unchecked")


def _make(framework: str, teacher: Any, student: Any) -> Any:
    """A training step of ``framework``; ``kdkit_unchecked`` is kdkit with
    ``check_finite=False`` (no per-step read of the loss for NaN/Inf)."""
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    if framework == "torchdistill":
        return _torchdistill_step(teacher, student)
    return _kdkit_step(teacher, student, check_finite=framework == "kdkit")


def worker_time(
    mode: str, keep_freed_memory: bool = True, batch: int | None = None
) -> dict[str, Any]:
    allocator = fix_allocator(default=not keep_freed_memory)
    cfg = _config(mode, batch)
    teacher, student, batches = _models(cfg)
    steps = {fw: _make(fw, teacher, student) for fw in VARIANTS}
    # Same initial weights and batch: the first losses must agree (the same KD on both sides).
    x, y = batches[0]
    first = {fw: float(step(x, y)) for fw, step in steps.items()}
    times = interleaved(
        {fw: cycling(lambda b, s=s: s(*b), batches) for fw, s in steps.items()},
        cfg["repeats"],
        warmup=3,
    )
    phases = phase_times(teacher, student, batches, cfg["phase_repeats"])
    ops = {fw: ops_per_step(step, batches) for fw, step in steps.items()}
    calls = {fw: python_calls_per_step(step, batches) for fw, step in steps.items()}
    import torch
    import torchdistill

    return {
        "config": cfg,
        "allocator": allocator,
        "torch": torch.__version__,
        "torchdistill": getattr(torchdistill, "__version__", "?"),
        "first_loss": first,
        "first_loss_abs_diff": abs(first["kdkit"] - first["torchdistill"]),
        "phase_median_s": phases,
        "ops_per_step": ops,
        "python_calls_per_step": calls,
        "step_s": {k: summary(v) for k, v in times.items()},
        "ratio_kdkit_over_torchdistill": paired_ratio(times["kdkit"], times["torchdistill"]),
        "floor_ratio_kdkit_over_torchdistill": floor_ratio(times["kdkit"], times["torchdistill"]),
        "ratio_unchecked_over_torchdistill": paired_ratio(
            times["kdkit_unchecked"], times["torchdistill"]
        ),
    }


def phase_times(teacher: Any, student: Any, batches: list[Any], repeats: int) -> dict[str, Any]:
    """Where a step's time goes, per framework: teacher, student, loss, the rest of the forward
    and backward + optimizer step (medians, interleaved like the main measurement).

    Each framework's own methods are wrapped on fresh copies of its step (kdkit's
    ``teacher_outputs``, the student's ``forward``, ``compute_loss``, ``forward``;
    torchdistill's ``get_teacher_output``, the student's ``forward``, ``criterion``,
    ``forward_process``), so the step runs unchanged, plus one timer call per phase on both.
    """
    clocks: dict[str, dict[str, float]] = {}
    steps = {}
    for fw in ("kdkit", "torchdistill"):
        step, clock = _make(fw, teacher, student), clocks.setdefault(fw, {})
        for phase, (owner, name) in step.phases.items():
            setattr(owner, name, _timed(getattr(owner, name), clock, phase))
        steps[fw] = step
    samples: dict[str, dict[str, list[float]]] = {fw: {} for fw in steps}

    def many(fw: str) -> Any:
        count = [0]

        def go() -> None:
            start = time.perf_counter()
            steps[fw](*batches[count[0] % len(batches)])
            total = time.perf_counter() - start
            c = clocks[fw]
            rest = c["forward"] - c["teacher"] - c["student"] - c["loss"]
            phases = {**c, "rest_of_forward": rest, "backward_and_step": total - c["forward"]}
            for phase, value in phases.items():
                samples[fw].setdefault(phase, []).append(value)
            count[0] += 1

        return go

    interleaved({fw: many(fw) for fw in steps}, repeats, warmup=3)
    return {
        fw: {phase: statistics.median(v) for phase, v in by_phase.items() if phase != "forward"}
        for fw, by_phase in samples.items()
    }


def _timed(fn: Any, clock: dict[str, float], phase: str) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[phase] = time.perf_counter() - start

    return timed


def ops_per_step(step: Any, batches: list[Any], steps: int = 4) -> float:
    """Torch ops (every profiler event: forward, backward, optimizer) per training step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(*batches[i % len(batches)])
    return sum(e.count for e in prof.key_averages()) / steps


def python_calls_per_step(step: Any, batches: list[Any], steps: int = 20) -> float:
    """Python function calls (cProfile's count, C functions included) per training step: what
    the op count does not see, the interpreter's share of a step, also load-free."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(steps):
        step(*batches[i % len(batches)])
    profiler.disable()
    return pstats.Stats(profiler).total_calls / steps


def worker_memory(mode: str, framework: str, batch: int | None = None) -> dict[str, Any]:
    cfg = _config(mode, batch)
    if framework == "torchdistill":
        import torchdistill  # noqa: F401  (its import is part of its footprint)
    teacher, student, batches = _models(cfg)
    step = _make(framework, teacher, student)
    del teacher, student
    after_setup = current_rss_mib()
    for i in range(cfg["memory_steps"]):
        step(*batches[i % len(batches)])
    peak = peak_rss_mib()
    return {
        "peak_rss_mib": peak,
        "setup_rss_mib": after_setup,
        "train_peak_over_setup_mib": peak - after_setup,
    }


# ---------------------------------------------------------------------------- driver side
def find_td_python(explicit: str | None = None) -> tuple[str | None, str]:
    """A Python that imports torchdistill, and how it was found (or why none was)."""
    candidates = [
        explicit,
        os.environ.get("KDKIT_TD_PYTHON"),
        sys.executable,
        "/tmp/tdvenv/bin/python",
    ]
    tried = []
    for cand in candidates:
        if not cand or cand in tried:
            continue
        tried.append(cand)
        if not Path(cand).exists():
            continue
        ok = subprocess.run(
            [cand, "-c", "import torchdistill"], capture_output=True, text=True, timeout=120
        )
        if ok.returncode == 0:
            return cand, f"torchdistill imported by {cand}"
    return None, (
        f"not measured: torchdistill is not importable by any of {tried}; install it in a "
        f"separate venv: {INSTALL_HINT} (or pass --td-python)"
    )


def _run_worker(python: str, args: list[str], threads: int | None) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    cmd = [python, str(Path(__file__).resolve()), *args]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(
            f"vs_torchdistill worker {args} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    mode: str = "quick",
    threads: int | None = None,
    td_python: str | None = None,
    keep_freed_memory: bool = True,
    batch: int | None = None,
) -> dict[str, Any]:
    threads = set_threads(threads)
    python, how = find_td_python(td_python)
    result: dict[str, Any] = {"benchmark": "vs_torchdistill", "mode": mode, "threads": threads}
    if python is None:
        result.update(measured=False, reason=how)
        print(how, file=sys.stderr)
        return result
    options = ["--mode", mode] + ([] if batch is None else ["--batch", str(batch)])
    allocator = [] if keep_freed_memory else ["--default-allocator"]
    timing = _run_worker(python, ["--worker", "time", *options, *allocator], threads)
    memory = {
        fw: _run_worker(python, ["--worker", "memory", "--framework", fw, *options], threads)
        for fw in ("kdkit", "torchdistill")
    }
    result.update(
        measured=True,
        python=python,
        timing=timing,
        memory=memory,
        memory_method="getrusage ru_maxrss, one fresh process per framework",
        ratio_peak_rss_kdkit_over_torchdistill=memory["kdkit"]["peak_rss_mib"]
        / memory["torchdistill"]["peak_rss_mib"],
        ratio_train_increment_kdkit_over_torchdistill=(
            memory["kdkit"]["train_peak_over_setup_mib"]
            / memory["torchdistill"]["train_peak_over_setup_mib"]
            if memory["torchdistill"]["train_peak_over_setup_mib"] > 0
            else None
        ),
    )
    return result


def report(result: dict[str, Any]) -> str:
    if not result.get("measured"):
        return f"- {result['reason']}"
    t = result["timing"]
    m = result["memory"]
    c = t["config"]
    inc = result["ratio_train_increment_kdkit_over_torchdistill"]
    return "\n".join(
        [
            f"- torch {t['torch']}, torchdistill {t['torchdistill']} (interpreter "
            f"`{result['python']}`); teacher small_cnn(width={c['teacher_width']}), student "
            f"small_cnn(width={c['student_width']}), input [{c['batch']}, 3, {c['size']}, "
            f"{c['size']}], 0.5 CE + 0.5 T^2 KL (T=4), SGD; {result['threads']} torch threads; "
            f"allocator (time): {t['allocator']}",
            f"- first-step loss: kdkit {t['first_loss']['kdkit']:.6f}, torchdistill "
            f"{t['first_loss']['torchdistill']:.6f} (same KD; |diff| "
            f"{t['first_loss_abs_diff']:.2e})",
            f"- step time: kdkit {fmt_ms(t['step_s']['kdkit'])}, torchdistill "
            f"{fmt_ms(t['step_s']['torchdistill'])}",
            f"- torch ops per step (torch.profiler, load-free): kdkit "
            f"{t['ops_per_step']['kdkit']:.0f}, torchdistill "
            f"{t['ops_per_step']['torchdistill']:.0f}; Python function calls per step (cProfile): "
            f"kdkit {t['python_calls_per_step']['kdkit']:.0f}, torchdistill "
            f"{t['python_calls_per_step']['torchdistill']:.0f}",
            f"- **step-time ratio kdkit / torchdistill: "
            f"{fmt_ratio(t['ratio_kdkit_over_torchdistill'])}**; fastest steps: min "
            f"{t['floor_ratio_kdkit_over_torchdistill']['min']:.3f}, first quartile "
            f"{t['floor_ratio_kdkit_over_torchdistill']['q1']:.3f}",
            _phase_line(t["phase_median_s"], c["phase_repeats"]),
            f"- kdkit with `check_finite=False` (its one per-step read of the loss for NaN/Inf "
            f"left out; the default is on): ratio "
            f"{fmt_ratio(t['ratio_unchecked_over_torchdistill'])}",
            f"- peak RSS ({result['memory_method']}): kdkit {m['kdkit']['peak_rss_mib']:.0f} MiB, "
            f"torchdistill {m['torchdistill']['peak_rss_mib']:.0f} MiB; **ratio "
            f"{result['ratio_peak_rss_kdkit_over_torchdistill']:.3f}**",
            f"- training increment (peak - RSS after setup): kdkit "
            f"{m['kdkit']['train_peak_over_setup_mib']:.1f} MiB, torchdistill "
            f"{m['torchdistill']['train_peak_over_setup_mib']:.1f} MiB"
            + (f"; ratio {inc:.3f}" if inc is not None else ""),
        ]
    )


def _phase_line(phases: dict[str, dict[str, float]], n: int) -> str:
    k, td = phases["kdkit"], phases["torchdistill"]
    parts = ", ".join(
        f"{name.replace('_', ' ')} {1e6 * k[name]:.0f} vs {1e6 * td[name]:.0f} "
        f"({1e6 * (k[name] - td[name]):+.0f})"
        for name in ("teacher", "student", "loss", "rest_of_forward", "backward_and_step")
    )
    return f"- where the time goes (median us per phase, kdkit vs torchdistill, n={n}): {parts}"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = add_mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--td-python", default=None, help="a Python that imports torchdistill")
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--framework", choices=["kdkit", "torchdistill"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["smoke", "quick", "full"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size (default 64; 16 with --smoke)"
    )
    args = add_allocator_arg(parser).parse_args(argv)
    if args.worker:
        set_threads(args.threads)
        out = (
            worker_time(args.mode, not args.default_allocator, args.batch)
            if args.worker == "time"
            else worker_memory(args.mode, args.framework, args.batch)
        )
        print(json.dumps(out))
        return None
    result = run(
        mode_of(args), args.threads, args.td_python, not args.default_allocator, args.batch
    )
    write_json(result, args.json)
    print(report(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
