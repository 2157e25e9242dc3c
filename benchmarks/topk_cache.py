"""Top-k teacher caches on digits: bytes per sample vs the student's test accuracy.

One teacher (an MLP trained on the digits train split) is cached dense (float32 logits) and
top-k (fp16 log-probabilities, int16 class indices, float32 tail mass) for several k. For each
seed, a student with the same initialisation and the same batch order is distilled from each
cache (``0.9 * KL(T=4) + 0.1 * CE``) and evaluated on the fixed test split; a student trained
on the labels alone is the reference. Accuracies are mean ± std over seeds.

    python benchmarks/topk_cache.py [--quick | --smoke] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_mode_args, mode_of, pick, set_threads, write_json  # noqa: E402

from kdkit import Distiller, Term  # noqa: E402
from kdkit.cache import TeacherCache  # noqa: E402
from kdkit.data import build_datasets  # noqa: E402
from kdkit.losses import CrossEntropyLoss, KLDivLoss  # noqa: E402
from kdkit.models import create_model  # noqa: E402

TEMPERATURE = 4.0


def _tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([int(it[1]) for it in items])
    idx = torch.tensor([int(it[2]) for it in items])
    return x, y, idx


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", 10, in_channels=1, image_size=8, hidden_sizes=(32,))


def _train(
    step: Any,
    params: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    epochs: int,
    seed: int,
    batch: int = 64,
) -> None:
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch):
            b = order[start : start + batch]
            loss = step(x[b], y[b], idx[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def run(mode: str = "quick", threads: int | None = None) -> dict[str, Any]:
    threads = set_threads(threads)
    seeds = list(range(pick(mode, 1, 3, 5)))
    epochs = pick(mode, 2, 20, 60)
    teacher_epochs = pick(mode, 3, 30, 60)
    ks: list[int | None] = pick(mode, [1, None], [1, 2, 3, 5, None], [1, 2, 3, 5, 10, None])
    splits = build_datasets("digits")
    xtr, ytr, itr = _tensors(splits.train)
    xte, yte, _ = _tensors(splits.test)

    torch.manual_seed(1234)
    teacher = create_model("mlp", 10, in_channels=1, image_size=8, hidden_sizes=(256, 128))
    ce = CrossEntropyLoss()
    teacher.train()
    _train(
        lambda x, y, i: ce(teacher(x), y),
        teacher.parameters(),
        xtr,
        ytr,
        itr,
        teacher_epochs,
        seed=1234,
    )
    teacher.eval()
    teacher_acc = _accuracy(teacher, xte, yte)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-topk-") as tmp:
        caches = {}
        for k in ks:
            name = "dense" if k is None else f"top{k}"
            start = time.perf_counter()
            caches[name] = (
                k,
                TeacherCache.build(
                    teacher, splits.train, Path(tmp) / name, top_k=k, batch_size=512
                ),
                time.perf_counter() - start,
            )
        # The labels-only reference: same students, same batch order, no teacher.
        accs = []
        for seed in seeds:
            s = _student(seed).train()
            _train(lambda x, y, i, s=s: ce(s(x), y), s.parameters(), xtr, ytr, itr, epochs, seed)
            accs.append(_accuracy(s, xte, yte))
        rows.append(
            {"cache": "none (labels only)", "top_k": None, "bytes_per_sample": 0, "test_acc": accs}
        )
        for name, (k, cache, build_s) in caches.items():
            accs = []
            for seed in seeds:
                distiller = Distiller(
                    _student(seed),
                    cache,
                    [
                        Term(KLDivLoss(TEMPERATURE), 0.9),
                        Term(CrossEntropyLoss(), 0.1, teacher=None, target=True),
                    ],
                ).train()

                def step(x, y, i, d=distiller):
                    return d(x, y, index=i).loss

                _train(step, distiller.parameters(), xtr, ytr, itr, epochs, seed)
                accs.append(_accuracy(distiller.student, xte, yte))
            rows.append(
                {
                    "cache": name,
                    "top_k": k,
                    "bytes_per_sample": cache.bytes_per_sample,
                    "build_s": build_s,
                    "test_acc": accs,
                }
            )
    for row in rows:
        accs = row["test_acc"]
        row["test_acc_mean"] = statistics.fmean(accs)
        row["test_acc_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {
        "benchmark": "topk_cache",
        "mode": mode,
        "threads": threads,
        "config": {
            "data": f"digits (train {len(ytr)}, test {len(yte)})",
            "teacher": "mlp(hidden=[256, 128])",
            "student": "mlp(hidden=[32])",
            "loss": f"0.9 KL(T={TEMPERATURE}) + 0.1 CE",
            "epochs": epochs,
            "seeds": seeds,
        },
        "teacher_test_acc": teacher_acc,
        "rows": rows,
    }


def report(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"- {c['data']}; teacher {c['teacher']} (test acc {result['teacher_test_acc']:.4f}); "
        f"student {c['student']}; {c['loss']}; Adam 3e-3, {c['epochs']} epochs; seeds "
        f"{c['seeds']}",
        "",
        "| cache | bytes / sample | student test acc (mean ± std over seeds) |",
        "| --- | ---: | --- |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['cache']} | {row['bytes_per_sample']} | {row['test_acc_mean']:.4f} ± "
            f"{row['test_acc_std']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = add_mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    result = run(mode_of(args), args.threads)
    write_json(result, args.json)
    print(report(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
