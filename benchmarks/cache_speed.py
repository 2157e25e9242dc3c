"""Epoch time of distillation from a TeacherCache vs the online teacher vs no teacher at all.

Same student (three copies of one initialisation), same data, same batches in the same order:

* ``student_only``: cross-entropy on the labels, no teacher;
* ``cached``: ``Distiller(student, cache, [CE, KL(T=4)])`` reading a dense ``TeacherCache`` by
  sample index (built once before timing; its build time is reported separately);
* ``online``: ``Distiller(student, teacher, [CE, KL(T=4)])`` running the teacher every step.

The teacher is much bigger than the student, so its cost is visible. The three variants take
turns batch by batch (each epoch time = its batches' fetch + step times), so the three epochs of
a repetition see the same machine load; ratios are medians of the per-repetition ratios.

    python benchmarks/cache_speed.py [--quick | --smoke] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_mode_args,
    floor_ratio,
    fmt_ms,
    fmt_ratio,
    mode_of,
    paired_ratio,
    pick,
    set_threads,
    summary,
    write_json,
)

from kdkit import Distiller, Term  # noqa: E402
from kdkit.cache import TeacherCache  # noqa: E402
from kdkit.data import build_datasets  # noqa: E402
from kdkit.losses import CrossEntropyLoss, KLDivLoss  # noqa: E402
from kdkit.models import count_parameters, create_model  # noqa: E402

GOAL = 1.10


def _terms() -> list[Term]:
    return [
        Term(CrossEntropyLoss(), 0.5, teacher=None, target=True),
        Term(KLDivLoss(4.0), 0.5),
    ]


def interleaved_epochs(
    steps: dict[str, Any], make_loader: Any, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Epoch times of each variant, the variants taking turns batch by batch.

    Each variant has its own DataLoader; in every round each variant fetches and trains on its
    next batch (rotating order), and the time of fetch + step is added to its epoch. So the
    epochs of one repetition run at the same time and see the same machine load.
    """
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + repeats):
        iters = {n: iter(make_loader(rep)) for n in names}
        epoch = dict.fromkeys(names, 0.0)
        done: set[str] = set()
        turn = 0
        while len(done) < len(names):
            shift = turn % len(names)
            for n in names[shift:] + names[:shift]:
                if n in done:
                    continue
                start = time.perf_counter()
                try:
                    x, y, idx = next(iters[n])
                except StopIteration:
                    done.add(n)
                    continue
                steps[n](x, y, idx)
                epoch[n] += time.perf_counter() - start
            turn += 1
        if rep >= warmup:
            for n in names:
                times[n].append(epoch[n])
    return times


def run(mode: str = "quick", threads: int | None = None) -> dict[str, Any]:
    threads = set_threads(threads)
    size = pick(mode, 64, 1024, 4096)
    shape = (3, 16, 16)
    batch = pick(mode, 32, 128, 128)
    repeats = pick(mode, 1, 5, 11)
    teacher_width = pick(mode, 8, 64, 64)
    student_width = pick(mode, 4, 16, 16)
    splits = build_datasets(
        "synthetic", num_classes=10, input_shape=shape, size=size, val_size=16, test_size=16
    )
    data = splits.train  # build_datasets yields (x, y, index) already
    torch.manual_seed(0)
    teacher = create_model("small_cnn", 10, width=teacher_width).eval()
    student = create_model("small_cnn", 10, width=student_width)

    with tempfile.TemporaryDirectory(prefix="kdkit-bench-cache-") as tmp:
        start = time.perf_counter()
        cache = TeacherCache.build(teacher, data, Path(tmp) / "cache", batch_size=256)
        build_s = time.perf_counter() - start

        def loader(rep: int) -> DataLoader:
            # Seeded by the repetition: every variant gets the same batches in the same order.
            gen = torch.Generator().manual_seed(rep)
            return DataLoader(data, batch_size=batch, shuffle=True, num_workers=0, generator=gen)

        s_plain = copy.deepcopy(student).train()
        opt_plain = torch.optim.SGD(s_plain.parameters(), lr=0.05, momentum=0.9)
        ce = CrossEntropyLoss()

        def plain_step(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
            loss = ce(s_plain(x), y)
            opt_plain.zero_grad(set_to_none=True)
            loss.backward()
            opt_plain.step()

        def kd_step_fn(teacher_or_cache: Any) -> Any:
            distiller = Distiller(copy.deepcopy(student), teacher_or_cache, _terms()).train()
            opt = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)

            def step(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
                out = distiller(x, y, index=idx)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()

            return step

        steps = {
            "student_only": plain_step,
            "cached": kd_step_fn(cache),
            "online": kd_step_fn(copy.deepcopy(teacher)),
        }
        times = interleaved_epochs(steps, loader, repeats, warmup=pick(mode, 0, 1, 1))
        bytes_per_sample = cache.bytes_per_sample

    cached_ratio = paired_ratio(times["cached"], times["student_only"])
    return {
        "benchmark": "cache_speed",
        "mode": mode,
        "threads": threads,
        "config": {
            "data": f"synthetic {size} samples of {list(shape)}, 10 classes, batch {batch}",
            "teacher": f"small_cnn(width={teacher_width}), {count_parameters(teacher)} params",
            "student": f"small_cnn(width={student_width}), {count_parameters(student)} params",
            "loss": "0.5 CE + 0.5 KL(T=4)",
        },
        "epoch_s": {k: summary(v) for k, v in times.items()},
        "ratio_cached_over_student_only": cached_ratio,
        "floor_ratio_cached_over_student_only": floor_ratio(times["cached"], times["student_only"]),
        "ratio_online_over_student_only": paired_ratio(times["online"], times["student_only"]),
        "ratio_online_over_cached": paired_ratio(times["online"], times["cached"]),
        "cache_build_s": build_s,
        "cache_bytes_per_sample": bytes_per_sample,
        "goal": GOAL,
        "meets_goal": cached_ratio["median"] <= GOAL,
    }


def report(result: dict[str, Any]) -> str:
    c = result["config"]
    e = result["epoch_s"]
    return "\n".join(
        [
            f"- data: {c['data']}; teacher {c['teacher']}; student {c['student']}; {c['loss']}; "
            f"{result['threads']} torch threads",
            f"- epoch time: student only {fmt_ms(e['student_only'])}, cached "
            f"{fmt_ms(e['cached'])}, online teacher {fmt_ms(e['online'])}",
            f"- **cached / student-only: {fmt_ratio(result['ratio_cached_over_student_only'])}** "
            f"(goal <= {result['goal']}: {'met' if result['meets_goal'] else 'NOT met'}); fastest "
            f"epochs: min {result['floor_ratio_cached_over_student_only']['min']:.3f}, first "
            f"quartile {result['floor_ratio_cached_over_student_only']['q1']:.3f}",
            f"- online / student-only: {fmt_ratio(result['ratio_online_over_student_only'])}; "
            f"online / cached: {fmt_ratio(result['ratio_online_over_cached'])}",
            f"- one-off cache build: {result['cache_build_s']:.2f} s, "
            f"{result['cache_bytes_per_sample']} bytes/sample (dense float32)",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = add_mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    result = run(mode_of(args), args.threads)
    write_json(result, args.json)
    print(report(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
