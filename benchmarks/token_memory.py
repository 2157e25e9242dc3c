"""Token losses: extra peak memory and time of a naive loop, kdkit's logit losses and the
fused-linear loss, side by side in one run (issue 10, "Done when", first bullet).

    python benchmarks/token_memory.py [--quick | --smoke] [--json out.json] [--threads N]
        [--variants name,name,...]   (a subset, each with its naive loop; default: all)

Full size: N = 2048 tokens, H = 512, V = 32000, float32, CPU, forward + backward.

* Logit inputs (student logits ``[N, V]`` requiring grad, teacher logits ``[N, V]``): the naive
  ``F.kl_div(log_softmax(s), softmax(t), reduction="batchmean")`` against kdkit's
  ``KLDivLoss`` / ``ReverseKLDivLoss`` / ``GeneralizedJSDLoss`` chunked (the default) and, for
  reference, unchunked (``chunk_size=None``).
* Hidden-state inputs (``[N, H]`` of both models and their lm_head weights ``[V, H]``): the
  naive loop with the logits (``x @ W.T``, teacher's under no_grad), the same with kdkit's
  chunked ``KLDivLoss`` on those logits, and ``FusedLinearJSDLoss`` at beta = 0 (forward KL: the
  naive loop's divergence) and beta = 0.5.
* Hugging Face GPT-2s (random init; student 1 layer, teacher 2, both of width H, vocabulary V,
  B = 4 sequences of N / 4 tokens): the naive loop (both models' logits, the naive KL), the
  Distiller with ``KLDivLoss`` on the full logits, and the Distiller with a
  ``FusedLinearJSDLoss(beta=0)`` term, whose models compute no logits (:mod:`kdkit.fused`);
  then the same with the student's cross-entropy on the labels (0.5 KL + 0.5 CE), as a separate
  ``CrossEntropyLoss`` term (the student's head runs) and inside the fused term
  (``ce_weight``: neither head runs). Their extra peak includes the models' activations and the
  student's gradients, alike in all of them.

Extra peak memory: each variant runs once in a fresh Python process, after a small warm-up at a
tiny size; it reads the resident set size after allocating its inputs (``VmRSS``) and the peak
after one forward + backward (``VmHWM`` of ``/proc/self/status``). The difference is reported as
a multiple of one ``[N, V]`` float32 tensor. Time: all variants in this process, interleaved
(:func:`common.interleaved`), median and IQR of the repetitions, and each variant's median of the
per-round ratios to its naive loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kdkit import losses as L  # noqa: E402

LOGIT_VARIANTS = (
    "naive_kl",
    "kl_chunked",
    "reverse_kl_chunked",
    "jsd_chunked",
    "kl_unchunked",
    "reverse_kl_unchunked",
    "jsd_unchunked",
)
HIDDEN_VARIANTS = ("naive_linear_kl", "linear_then_kl_chunked", "fused_kl", "fused_jsd")
HF_VARIANTS = (
    "naive_hf_kl",
    "distiller_hf_kl",
    "distiller_hf_fused",
    "distiller_hf_fused_and_ce",
    "distiller_hf_fused_ce",
)
NAIVE_OF = (
    {name: "naive_kl" for name in LOGIT_VARIANTS}
    | {name: "naive_linear_kl" for name in HIDDEN_VARIANTS}
    | {name: "naive_hf_kl" for name in HF_VARIANTS}
)


def _naive(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean")


def _logit_losses() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    def kdkit(loss: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda s, t: loss(s.unsqueeze(0), t.unsqueeze(0))  # token logits [1, N, V]

    return {
        "naive_kl": _naive,
        "kl_chunked": kdkit(L.KLDivLoss()),
        "reverse_kl_chunked": kdkit(L.ReverseKLDivLoss()),
        "jsd_chunked": kdkit(L.GeneralizedJSDLoss(0.5)),
        "kl_unchunked": kdkit(L.KLDivLoss(chunk_size=None)),
        "reverse_kl_unchunked": kdkit(L.ReverseKLDivLoss(chunk_size=None)),
        "jsd_unchunked": kdkit(L.GeneralizedJSDLoss(0.5, chunk_size=None)),
    }


def _hf_step(name: str, n: int, h: int, v: int, seed: int) -> Callable[[], float]:
    """A step of variant ``name`` with Hugging Face GPT-2s (see the module docstring)."""
    from kdkit import Distiller
    from kdkit.models import create_model

    batch, length = 4, max(n // 4, 1)

    def gpt2(layers: int, model_seed: int) -> torch.nn.Module:
        torch.manual_seed(model_seed)
        config = dict(
            vocab_size=v,
            n_embd=h,
            n_layer=layers,
            n_head=8 if h % 64 == 0 else 2,
            n_positions=length,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return create_model("hf:gpt2", v, head="causal_lm", config=config)

    student, teacher = gpt2(1, seed), gpt2(2, seed + 1).requires_grad_(False).eval()
    ids = torch.randint(0, v, (batch, length), generator=torch.Generator().manual_seed(seed))
    if name == "naive_hf_kl":

        def loss() -> torch.Tensor:
            with torch.no_grad():
                t = teacher(input_ids=ids).logits
            return _naive(student(input_ids=ids).logits.flatten(0, 1), t.flatten(0, 1))

    else:
        distiller = Distiller(student, teacher, _hf_terms(name))
        labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)  # shifted once

        def loss() -> torch.Tensor:
            return distiller({"input_ids": ids}, labels).loss

    def hf_step() -> float:
        student.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        return value.item()

    return hf_step


def _hf_terms(name: str) -> list[Any]:
    """The Distiller terms of an HF variant; the ``_ce`` ones also train on the labels, with a
    cross-entropy term beside the fused one (the student's head runs) or inside it
    (``ce_weight``: neither head runs)."""
    from kdkit import Term

    if name == "distiller_hf_kl":
        return [Term(L.KLDivLoss())]
    if name == "distiller_hf_fused":
        return [Term(L.FusedLinearJSDLoss(0.0, 1.0, None))]
    if name == "distiller_hf_fused_and_ce":
        ce = Term(L.CrossEntropyLoss(), 0.5, teacher=None, target=True)
        return [Term(L.FusedLinearJSDLoss(0.0, 1.0, -100), 0.5), ce]
    return [Term(L.FusedLinearJSDLoss(0.0, 1.0, -100, ce_weight=1.0), 0.5)]


def make_step(name: str, n: int, h: int, v: int, seed: int = 0) -> Callable[[], float]:
    """Allocate the inputs of variant ``name`` and return its forward + backward (-> the loss)."""
    if name in HF_VARIANTS:
        return _hf_step(name, n, h, v, seed)
    g = torch.Generator().manual_seed(seed)
    if name in LOGIT_VARIANTS:
        student = torch.randn(n, v, generator=g).requires_grad_(True)
        teacher = torch.randn(n, v, generator=g)
        loss = _logit_losses()[name]

        def logit_step() -> float:
            student.grad = None
            value = loss(student, teacher)
            value.backward()
            return value.item()

        return logit_step
    x_s = torch.randn(n, h, generator=g).requires_grad_(True)
    w_s = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_(True)
    x_t, w_t = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / h**0.5
    fused = {"fused_kl": L.FusedLinearJSDLoss(0.0), "fused_jsd": L.FusedLinearJSDLoss(0.5)}
    chunked_kl = L.KLDivLoss()

    def hidden_step() -> float:
        x_s.grad = w_s.grad = None
        if name in fused:
            value = fused[name](x_s, w_s, x_t, w_t)
        else:
            student = x_s @ w_s.T
            with torch.no_grad():
                teacher = x_t @ w_t.T
            if name == "naive_linear_kl":
                value = _naive(student, teacher)
            else:
                value = chunked_kl(student.unsqueeze(0), teacher.unsqueeze(0))
        value.backward()
        return value.item()

    return hidden_step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def child(name: str, n: int, h: int, v: int, threads: int | None) -> dict[str, float]:
    """One variant's extra peak memory in this (fresh) process, in MiB."""
    common.set_threads(threads)
    make_step(name, 8, 16, 64)()  # lazy initialisation outside the measurement
    step = make_step(name, n, h, v)
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    return {"before_mib": before / 1024, "extra_mib": (peak - before) / 1024}


def measure_memory(name: str, n: int, h: int, v: int, threads: int | None) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", name, "--size", f"{n},{h},{v}"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(
    mode: str = "full", threads: int | None = None, only: list[str] | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    torch_threads = common.set_threads(threads)
    n, h, v = common.pick(mode, (64, 32, 512), (512, 256, 8000), (2048, 512, 32000))
    repeats = common.pick(mode, 2, 3, 5)
    logits_mib = n * v * 4 / 2**20
    variants = tuple(
        name
        for name in LOGIT_VARIANTS + HIDDEN_VARIANTS + HF_VARIANTS
        if only is None or name in only or name in {NAIVE_OF[x] for x in only}
    )
    memory = {name: measure_memory(name, n, h, v, threads) for name in variants}
    steps = {name: make_step(name, n, h, v) for name in variants}
    times = common.interleaved(steps, repeats=repeats, warmup=1)
    rows = {}
    for name in variants:
        naive = NAIVE_OF[name]
        rows[name] = {
            "extra_peak_mib": memory[name]["extra_mib"],
            "extra_peak_x_logits": memory[name]["extra_mib"] / logits_mib,
            "extra_peak_vs_naive": memory[name]["extra_mib"] / memory[naive]["extra_mib"],
            "time": common.summary(times[name]),
            "time_vs_naive": common.paired_ratio(times[name], times[naive]),
        }
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "mode": mode,
        "only": only,
        "size": {"tokens": n, "hidden": h, "vocab": v, "dtype": "float32"},
        "logits_mib": logits_mib,
        "chunk_size": L.KLDivLoss().chunk_size,
        "fused_chunk_size": L.FusedLinearJSDLoss().chunk_size,
        "repeats": repeats,
        "variants": rows,
        "goals": _goals(rows),
        "load_average": list(load),
        "torch_threads": torch_threads,
        "machine": common.machine_info(),
        "wall_s": time.perf_counter() - start,
    }


def _goals(rows: dict[str, Any]) -> dict[str, float]:
    """The issue's goals, of the variants that ran."""
    goals = {}
    chunked = ("kl_chunked", "reverse_kl_chunked", "jsd_chunked")
    if all(name in rows for name in chunked):
        goals["chunked_logit_losses_max_x_logits"] = max(
            rows[name]["extra_peak_x_logits"] for name in chunked
        )
    if "fused_kl" in rows:
        goals["fused_kl_memory_vs_naive"] = rows["fused_kl"]["extra_peak_vs_naive"]
        goals["fused_kl_time_vs_naive"] = rows["fused_kl"]["time_vs_naive"]["median"]
    return goals


DESCRIPTIONS = {
    "naive_kl": "naive `F.kl_div(log_softmax(s), softmax(t), 'batchmean')`",
    "kl_chunked": "`KLDivLoss()` (chunked, default)",
    "reverse_kl_chunked": "`ReverseKLDivLoss()` (chunked)",
    "jsd_chunked": "`GeneralizedJSDLoss(0.5)` (chunked)",
    "kl_unchunked": "`KLDivLoss(chunk_size=None)`",
    "reverse_kl_unchunked": "`ReverseKLDivLoss(chunk_size=None)`",
    "jsd_unchunked": "`GeneralizedJSDLoss(0.5, chunk_size=None)`",
    "naive_linear_kl": "naive: `x @ W.T` logits, then the naive KL",
    "linear_then_kl_chunked": "`x @ W.T` logits, then `KLDivLoss()` (chunked)",
    "fused_kl": "`FusedLinearJSDLoss(beta=0)` (forward KL)",
    "fused_jsd": "`FusedLinearJSDLoss(beta=0.5)`",
    "naive_hf_kl": "HF GPT-2s: naive loop on both models' logits",
    "distiller_hf_kl": "HF GPT-2s: Distiller + `KLDivLoss()` on the logits",
    "distiller_hf_fused": "HF GPT-2s: Distiller + `FusedLinearJSDLoss(beta=0)` term (no logits)",
    "distiller_hf_fused_and_ce": "HF GPT-2s: the fused term + a `CrossEntropyLoss` term on the "
    "labels (the student's head runs)",
    "distiller_hf_fused_ce": "HF GPT-2s: `FusedLinearJSDLoss(beta=0, ce_weight=1)` (the same "
    "loss, neither head runs)",
}


def report(result: dict[str, Any]) -> str:
    size, goals = result["size"], result["goals"]
    m = result["machine"]
    load = ", ".join(f"{x:.2f}" for x in result["load_average"])
    lines = [
        "## Token losses: memory and time",
        "",
        f"- command: `python benchmarks/token_memory.py"
        f"{'' if result['mode'] == 'full' else ' --' + result['mode']}"
        f"{' --variants ' + ','.join(result['only']) if result.get('only') else ''}`",
        f"- N = {size['tokens']} tokens, H = {size['hidden']}, V = {size['vocab']}, "
        f"{size['dtype']}, CPU, forward + backward; one [N, V] tensor = "
        f"{result['logits_mib']:.0f} MiB; chunk_size {result['chunk_size']} (logit losses), "
        f"{result['fused_chunk_size']} (fused)",
        f"- machine: {m['cpu']}, {m['cores']} cores, {result['torch_threads']} torch threads, "
        f"torch {m['torch']}, Python {m['python']}; load average at the end: {load}",
        "- extra peak: a fresh process per variant, peak RSS (VmHWM) minus the RSS after "
        "allocating the inputs; time: all variants interleaved in one process, "
        f"{result['repeats']} rounds",
        "",
        "| variant | extra peak, x one [N, V] | extra peak / naive | time | time / naive |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for name, row in result["variants"].items():
        lines.append(
            f"| {DESCRIPTIONS[name]} | {row['extra_peak_x_logits']:.2f} | "
            f"{row['extra_peak_vs_naive']:.2f} | {common.fmt_ms(row['time'])} | "
            f"{common.fmt_ratio(row['time_vs_naive'])} |"
        )
    lines.append("")
    if "chunked_logit_losses_max_x_logits" in goals:
        chunked = goals["chunked_logit_losses_max_x_logits"]
        lines.append(
            f"- **chunked logit losses: extra peak <= {chunked:.2f}x one logits tensor** (goal "
            f"<= 2: {'met' if chunked <= 2 else 'not met'})"
        )
    if "fused_kl_memory_vs_naive" in goals:
        memory, speed = goals["fused_kl_memory_vs_naive"], goals["fused_kl_time_vs_naive"]
        lines.append(
            f"- **fused-linear (beta=0) vs the naive loop: extra peak {memory:.2f}x** (goal <= "
            f"0.25: {'met' if memory <= 0.25 else 'not met'}), **time {speed:.2f}x** (goal <= "
            f"1.2: {'met' if speed <= 1.2 else 'not met'})"
        )
    lines += ["", f"(wall time {result['wall_s']:.0f} s)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.add_mode_args(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument(
        "--variants", help=f"comma-separated subset of {', '.join(NAIVE_OF)} (default: all)"
    )
    args = parser.parse_args(argv)
    if args.child:
        n, h, v = (int(x) for x in args.size.split(","))
        result = child(args.child, n, h, v, args.threads)
        print(json.dumps(result))
        return result
    only = None if args.variants is None else args.variants.split(",")
    unknown = sorted(set(only or ()) - set(NAIVE_OF))
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {', '.join(NAIVE_OF)}")
    result = run(common.mode_of(args), args.threads, only)
    print(report(result))
    if args.json is not None:
        common.write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
