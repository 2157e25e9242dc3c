"""GPU throughput: ResNet-50 -> ResNet-18 KD on CIFAR-10-shaped batches, bf16 + channels_last.

Random data of CIFAR-10 shape ([B, 3, 32, 32], 10 classes; nothing is downloaded). Teacher
``tv:resnet50``, student ``tv:resnet18``, both with ``cifar_stem=True``. Two variants, their
repetitions interleaved, each timed with ``torch.cuda.synchronize()`` at both ends:

* ``kdkit``: ``Distiller(student, teacher, [Term(KLDivLoss(4))])`` — with its speed options
  ``autocast_dtype=torch.bfloat16, channels_last=True, compile=False`` when this kdkit has them,
  otherwise the models are converted to channels_last and the step runs under
  ``torch.autocast("cuda", torch.bfloat16)`` from outside;
* ``floor``: the hand-written step (teacher forward under ``no_grad`` in eval, student forward,
  ``T^2 * KL`` inline, backward, SGD step) with the same autocast and memory format.

Reports images/s and the ratio kdkit / floor (time). Without CUDA it records that nothing was
measured.

    python benchmarks/gpu_throughput.py [--quick | --smoke] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_mode_args,
    distiller_speed_options,
    fmt_ratio,
    interleaved,
    mode_of,
    paired_ratio,
    pick,
    summary,
    write_json,
)

from kdkit import Distiller, Term  # noqa: E402
from kdkit.losses import KLDivLoss  # noqa: E402
from kdkit.models import create_model  # noqa: E402

NO_GPU = "not measured: no GPU in this session"
TEMPERATURE = 4.0


def run(
    mode: str = "quick", threads: int | None = None, device: str | None = None
) -> dict[str, Any]:
    """``device="cpu"`` runs the same code on the CPU (a check of the script, not a benchmark)."""
    result: dict[str, Any] = {"benchmark": "gpu_throughput", "mode": mode}
    if device is None and not torch.cuda.is_available():
        result.update(measured=False, reason=NO_GPU)
        return result
    dev = torch.device(device or "cuda")
    on_cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    batch = pick(mode, 32, 256, 256) if on_cuda else 2
    steps = pick(mode, 2, 10, 20) if on_cuda else 1
    repeats = pick(mode, 2, 7, 15) if on_cuda else 1
    warmup = 2 if on_cuda else 1
    teacher_name = pick(mode, "tv:resnet18", "tv:resnet50", "tv:resnet50")
    torch.manual_seed(0)
    teacher = create_model(teacher_name, 10, cifar_stem=True).to(dev).eval()
    student = create_model("tv:resnet18", 10, cifar_stem=True).to(dev)
    cl = torch.channels_last
    batches = [
        (
            torch.randn(batch, 3, 32, 32, device=dev).to(memory_format=cl),
            torch.randint(0, 10, (batch,), device=dev),
        )
        for _ in range(2)
    ]
    T = TEMPERATURE
    bf16 = torch.bfloat16

    # hand-written floor
    t_f = copy.deepcopy(teacher).to(memory_format=cl).requires_grad_(False)
    s_f = copy.deepcopy(student).to(memory_format=cl).train()
    opt_f = torch.optim.SGD(s_f.parameters(), lr=0.01, momentum=0.9)

    def floor_step(x: torch.Tensor) -> None:
        with torch.autocast(dev.type, dtype=bf16):
            t_f.eval()
            with torch.no_grad():
                z_t = t_f(x)
            z_s = s_f(x)
            loss = (T * T) * F.kl_div(
                F.log_softmax(z_s.float() / T, dim=-1),
                F.log_softmax(z_t.float() / T, dim=-1),
                reduction="batchmean",
                log_target=True,
            )
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        opt_f.step()

    # kdkit
    options = distiller_speed_options()
    kw: dict[str, Any] = {}
    if {"autocast_dtype", "channels_last"} <= options:
        kw = {"autocast_dtype": bf16, "channels_last": True}
        if "compile" in options:
            kw["compile"] = False
        t_k, s_k = copy.deepcopy(teacher), copy.deepcopy(student)
    else:
        t_k = copy.deepcopy(teacher).to(memory_format=cl)
        s_k = copy.deepcopy(student).to(memory_format=cl)
    distiller = Distiller(s_k, t_k, [Term(KLDivLoss(T))], **kw).train()
    opt_k = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)

    def kd_step(x: torch.Tensor) -> None:
        if kw:
            out = distiller(x)
        else:
            with torch.autocast(dev.type, dtype=bf16):
                out = distiller(x)
        opt_k.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_k.step()

    def many(step: Any) -> Any:
        def go() -> None:
            sync()
            for i in range(steps):
                step(batches[i % len(batches)][0])
            sync()

        return go

    times = interleaved({"floor": many(floor_step), "kdkit": many(kd_step)}, repeats, warmup=warmup)
    imgs = {k: [batch * steps / t for t in v] for k, v in times.items()}
    result.update(
        measured=True,
        device=torch.cuda.get_device_name(0) if on_cuda else "cpu (script check only)",
        torch=torch.__version__,
        config={
            "teacher": f"{teacher_name} (cifar_stem)",
            "student": "tv:resnet18 (cifar_stem)",
            "batch": batch,
            "distiller_options": {k: str(v) for k, v in kw.items()} or "outer autocast",
        },
        images_per_s={k: summary(v) for k, v in imgs.items()},
        ratio_kdkit_time_over_floor=paired_ratio(times["kdkit"], times["floor"]),
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
    )
    return result


def report(result: dict[str, Any]) -> str:
    if not result.get("measured"):
        return f"- {result['reason']}"
    c = result["config"]
    ips = result["images_per_s"]
    return "\n".join(
        [
            f"- {result['device']}, torch {result['torch']}; teacher {c['teacher']}, student "
            f"{c['student']}, batch {c['batch']}, bf16 autocast + channels_last "
            f"({c['distiller_options']})",
            f"- images/s: hand-written floor {ips['floor']['median']:.0f}, kdkit "
            f"{ips['kdkit']['median']:.0f}",
            f"- **time ratio kdkit / floor: {fmt_ratio(result['ratio_kdkit_time_over_floor'])}**",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = add_mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    result = run(mode_of(args), args.threads, args.device)
    write_json(result, args.json)
    print(report(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
