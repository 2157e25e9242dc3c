"""Overhead of a kdkit Distiller training step over the same step written by hand.

Both variants train their own copy of the same student (same initial weights, same optimizer
settings) against the same frozen teacher on the same pre-built batches:

* ``kdkit``: ``Distiller(student, teacher, [Term(KLDivLoss(T))])``; ``out = distiller(x)``,
  ``out.loss.backward()``, ``opt.step()``;
* ``hand``: teacher forward in eval mode under ``no_grad``, student forward,
  ``T^2 * kl_div(log_softmax(z_s / T), log_softmax(z_t / T), batchmean)``, backward, step.

A second pair measures a step with feature terms (issue 7, section 5): a 3-block CNN teacher
(width 48) and student (width 16), logit KD + MSE on two hooked layers through 1x1-conv adapters
+ attention transfer on the same two layers:

* ``kdkit``: ``Distiller(student, teacher, [Term(KLDivLoss(T)), Term(MSEHiddenStatesLoss(),
  student=layers, teacher=layers, adapter="conv"), Term(AttentionLoss(), student=layers,
  teacher=layers)], example_input=x)``;
* ``hand``: forward hooks registered ONCE on both models, two hand-made ``nn.Conv2d(c_s, c_t,
  1)`` adapters (initialised like the Distiller's), the same three losses in plain torch.

One repetition is one training step; the variants alternate step by step (so both see the
same machine load) and the reported ratio is the median of the per-pair ratios kdkit / hand.
``--profile`` adds a torch.profiler account of the ops that only the Distiller runs.

The process keeps freed memory (glibc malloc's trim and mmap thresholds fixed,
``common.fix_allocator``): by default the allocator hands large freed blocks back to the OS and
every step page-faults them in again, ~20% of a step here, by an amount that depends on which
tensors outlive a step; ``--default-allocator`` measures with malloc's defaults.

    python benchmarks/overhead.py [--quick | --smoke] [--only logits|features] [--profile]
                                  [--default-allocator] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_allocator_arg,
    add_mode_args,
    cycling,
    distiller_speed_options,
    fix_allocator,
    floor_ratio,
    fmt_ms,
    fmt_ratio,
    interleaved,
    mode_of,
    paired_ratio,
    pick,
    set_threads,
    summary,
    write_json,
)

from kdkit import Distiller, Term  # noqa: E402
from kdkit.losses import AttentionLoss, KLDivLoss, MSEHiddenStatesLoss  # noqa: E402
from kdkit.models import create_model  # noqa: E402

TEMPERATURE = 4.0
GOAL = 1.03
FEATURE_GOAL = 1.05
FEATURE_LAYERS = ("block2", "block3")
SECTIONS = ("logits", "features")


def hand_kd(z_s: torch.Tensor, z_t: torch.Tensor, T: float = TEMPERATURE) -> torch.Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, batchmean, written by hand."""
    return (T * T) * F.kl_div(
        F.log_softmax(z_s / T, dim=-1),
        F.log_softmax(z_t / T, dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def sgd_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def setup(mode: str, seed: int = 0) -> dict[str, Any]:
    """Models, batches and the two step functions."""
    batch = pick(mode, 16, 64, 64)
    size = pick(mode, 8, 16, 16)
    n_batches = 4
    torch.manual_seed(seed)
    teacher = create_model("small_cnn", 10, width=pick(mode, 8, 32, 32))
    student = create_model("small_cnn", 10, width=pick(mode, 4, 16, 16))
    batches = [torch.randn(batch, 3, size, size) for _ in range(n_batches)]

    s_hand = copy.deepcopy(student).train()
    s_kd = copy.deepcopy(student).train()
    t_hand = copy.deepcopy(teacher).requires_grad_(False)
    t_kd = copy.deepcopy(teacher)
    opt_hand = torch.optim.SGD(s_hand.parameters(), lr=0.01, momentum=0.9)
    distiller = Distiller(s_kd, t_kd, [Term(KLDivLoss(TEMPERATURE))])
    distiller.train()
    opt_kd = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)

    def hand_step(x: torch.Tensor) -> None:
        t_hand.eval()
        with torch.no_grad():
            z_t = t_hand(x)
        z_s = s_hand(x)
        loss = hand_kd(z_s, z_t)
        sgd_step(opt_hand, loss)

    def kd_step(x: torch.Tensor) -> None:
        sgd_step(opt_kd, distiller(x).loss)

    return {
        "batches": batches,
        "hand_step": hand_step,
        "kd_step": kd_step,
        "distiller": distiller,
        "config": {
            "teacher": f"small_cnn(width={pick(mode, 8, 32, 32)})",
            "student": f"small_cnn(width={pick(mode, 4, 16, 16)})",
            "input": [batch, 3, size, size],
            "loss": f"KLDivLoss(T={TEMPERATURE})",
            "optimizer": "SGD(lr=0.01, momentum=0.9)",
        },
    }


def setup_features(mode: str, seed: int = 0) -> dict[str, Any]:
    """The feature step: logit KD + MSE through 1x1-conv adapters + attention transfer."""
    batch = pick(mode, 16, 64, 64)
    size = pick(mode, 8, 16, 16)
    t_width, s_width = pick(mode, 8, 48, 48), pick(mode, 4, 16, 16)
    torch.manual_seed(seed)
    teacher = create_model("small_cnn", 10, width=t_width)
    student = create_model("small_cnn", 10, width=s_width)
    batches = [torch.randn(batch, 3, size, size) for _ in range(4)]
    layers = list(FEATURE_LAYERS)

    s_kd = copy.deepcopy(student).train()
    t_kd = copy.deepcopy(teacher)
    distiller = Distiller(
        s_kd,
        t_kd,
        [
            Term(KLDivLoss(TEMPERATURE)),
            Term(MSEHiddenStatesLoss(), student=layers, teacher=layers, adapter="conv"),
            Term(AttentionLoss(), student=layers, teacher=layers),
        ],
        example_input=batches[0],
    )
    distiller.train()
    opt_kd = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)

    s_hand = copy.deepcopy(student).train()
    t_hand = copy.deepcopy(teacher).requires_grad_(False).eval()
    # The same 1x1 convs as the Distiller's adapters (same shapes, same initial weights).
    adapters = nn.ModuleList(
        nn.Conv2d(s_width * 2**i, t_width * 2**i, kernel_size=1) for i in (1, 2)
    )
    for i, adapter in enumerate(adapters):
        adapter.load_state_dict(distiller.adapters[f"mse_hidden_states__{i}"].conv.state_dict())
    opt_hand = torch.optim.SGD(
        [*s_hand.parameters(), *adapters.parameters()], lr=0.01, momentum=0.9
    )
    s_feats: dict[str, torch.Tensor] = {}
    t_feats: dict[str, torch.Tensor] = {}

    def keep(store: dict[str, torch.Tensor], name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            store[name] = output

        return hook

    for name in layers:  # registered once, for the whole run
        s_hand.get_submodule(name).register_forward_hook(keep(s_feats, name))
        t_hand.get_submodule(name).register_forward_hook(keep(t_feats, name))

    def attention(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)

    def hand_loss(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z_t = t_hand(x)
        z_s = s_hand(x)
        kd = hand_kd(z_s, z_t)
        mse = sum(
            F.mse_loss(a(s_feats[n]), t_feats[n]) for a, n in zip(adapters, layers, strict=True)
        ) / len(layers)
        at = sum(
            (attention(s_feats[n]) - attention(t_feats[n])).pow(2).mean() for n in layers
        ) / len(layers)
        return kd + mse + at

    def hand_step(x: torch.Tensor) -> None:
        loss = hand_loss(x)
        sgd_step(opt_hand, loss)

    def kd_step(x: torch.Tensor) -> None:
        sgd_step(opt_kd, distiller(x).loss)

    # Same weights, same batch, same losses: the first losses must agree (before any step).
    with torch.no_grad():
        first = {"hand": float(hand_loss(batches[0])), "kdkit": float(distiller(batches[0]).loss)}
    return {
        "batches": batches,
        "hand_step": hand_step,
        "kd_step": kd_step,
        "distiller": distiller,
        "first_loss": first,
        "config": {
            "teacher": f"small_cnn(width={t_width})",
            "student": f"small_cnn(width={s_width})",
            "input": [batch, 3, size, size],
            "loss": f"KLDivLoss(T={TEMPERATURE}) + MSEHiddenStatesLoss on {layers} through "
            "1x1-conv adapters + AttentionLoss on the same layers",
            "optimizer": "SGD(lr=0.01, momentum=0.9)",
        },
    }


def measure(env: dict[str, Any], repeats: int, goal: float) -> dict[str, Any]:
    """Interleaved kdkit / hand steps (one step per repetition) and their ratio."""
    batches = env["batches"]
    # One step per repetition, alternating kdkit / hand: adjacent steps see the same machine
    # load, so the median of the per-pair ratios stays stable on a shared, busy machine.
    times = interleaved(
        {"hand": cycling(env["hand_step"], batches), "kdkit": cycling(env["kd_step"], batches)},
        repeats,
        warmup=3,
    )
    ratio = paired_ratio(times["kdkit"], times["hand"])
    return {
        "config": env["config"],
        "repeats": repeats,
        "step_s": {k: summary(v) for k, v in times.items()},
        "ratio_kdkit_over_hand": ratio,
        "floor_ratio_kdkit_over_hand": floor_ratio(times["kdkit"], times["hand"]),
        "goal": goal,
        "meets_goal": ratio["median"] <= goal,
    }


def run(
    mode: str = "quick",
    threads: int | None = None,
    profile: bool = False,
    only: str | None = None,
    keep_freed_memory: bool = False,
) -> dict[str, Any]:
    """The logit step (top-level keys) and the feature step (``result["features"]``)."""
    if only is not None and only not in SECTIONS:
        raise ValueError(f"only must be one of {SECTIONS} or None, got {only!r}")
    allocator = fix_allocator(default=not keep_freed_memory)
    threads = set_threads(threads)
    repeats = pick(mode, 4, 150, 1500)
    profile_steps = pick(mode, 2, 10, 20)
    result: dict[str, Any] = {
        "benchmark": "overhead",
        "mode": mode,
        "threads": threads,
        "allocator": allocator,
        "speed_options_available": sorted(distiller_speed_options()),
    }
    if only in (None, "logits"):
        env = setup(mode)
        result.update(measure(env, repeats, GOAL))
        if profile:
            result["profile"] = profile_difference(env, profile_steps)
    if only in (None, "features"):
        env = setup_features(mode)
        features = measure(env, repeats, FEATURE_GOAL)
        features["first_loss"] = env["first_loss"]
        if profile:
            features["profile"] = profile_difference(env, profile_steps)
        result["features"] = features
    return result


def profile_difference(env: dict[str, Any], steps: int) -> dict[str, Any]:
    """What kdkit runs that the hand-written step does not, from torch.profiler.

    Op counts per step are deterministic, so the ops whose count differs are exactly the extra
    work; their self CPU time (per step, from the kdkit profile) says what that work costs.
    Per-op time differences of ops both variants run are load noise and are not reported.
    """
    from torch.profiler import ProfilerActivity, profile

    stats: dict[str, dict[str, tuple[float, float]]] = {}
    for name, step in (("hand", env["hand_step"]), ("kdkit", env["kd_step"])):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                step(env["batches"][i % len(env["batches"])])
        stats[name] = {
            e.key: (e.count / steps, e.self_cpu_time_total / steps / 1e3)  # calls, ms per step
            for e in prof.key_averages()
        }
    extra = {}
    for key, (calls, ms) in stats["kdkit"].items():
        hand_calls = stats["hand"].get(key, (0.0, 0.0))[0]
        if calls > hand_calls:
            extra[key] = {
                "extra_calls_per_step": calls - hand_calls,
                "extra_self_cpu_ms_per_step": ms * (calls - hand_calls) / calls,
            }
    top = dict(sorted(extra.items(), key=lambda kv: -kv[1]["extra_self_cpu_ms_per_step"])[:10])
    return {
        "hand_ops_per_step": sum(c for c, _ in stats["hand"].values()),
        "kdkit_ops_per_step": sum(c for c, _ in stats["kdkit"].values()),
        "extra_ops": top,
        "extra_self_cpu_ms_per_step": sum(v["extra_self_cpu_ms_per_step"] for v in extra.values()),
    }


def _report_section(r: dict[str, Any], threads: int, allocator: str) -> list[str]:
    c = r["config"]
    lines = [
        f"- models: teacher {c['teacher']}, student {c['student']}, input {c['input']}, "
        f"{c['loss']}, {c['optimizer']}, {threads} torch threads; allocator: {allocator}",
    ]
    if "first_loss" in r:
        lines.append(
            f"- first-step loss (same weights, same batch): hand {r['first_loss']['hand']:.6f}, "
            f"kdkit {r['first_loss']['kdkit']:.6f}"
        )
    lines += [
        f"- hand-written step: {fmt_ms(r['step_s']['hand'])}",
        f"- kdkit Distiller step: {fmt_ms(r['step_s']['kdkit'])}",
        f"- **ratio kdkit / hand: {fmt_ratio(r['ratio_kdkit_over_hand'])}** (goal <= "
        f"{r['goal']}: {'met' if r['meets_goal'] else 'NOT met'})",
        f"- ratio of the fastest steps (least disturbed by other load): min "
        f"{r['floor_ratio_kdkit_over_hand']['min']:.3f}, first quartile "
        f"{r['floor_ratio_kdkit_over_hand']['q1']:.3f}",
    ]
    if "profile" in r:
        prof = r["profile"]
        lines.append(
            f"- torch.profiler, ops per step: hand {prof['hand_ops_per_step']:.0f}, kdkit "
            f"{prof['kdkit_ops_per_step']:.0f}; the ops only kdkit runs cost "
            f"{prof['extra_self_cpu_ms_per_step']:.3f} ms/step of self CPU time: "
            + ", ".join(
                f"`{k}` x{v['extra_calls_per_step']:.0f} {v['extra_self_cpu_ms_per_step']:.3f} ms"
                for k, v in list(prof["extra_ops"].items())[:8]
            )
        )
    return lines


def report(result: dict[str, Any]) -> str:
    lines = []
    if "ratio_kdkit_over_hand" in result:
        section = _report_section(result, result["threads"], result["allocator"])
        lines += ["Logit step (KD only):", "", *section]
    if "features" in result:
        if lines:
            lines.append("")
        lines += [
            "Feature step (KD + MSE through 1x1-conv adapters + attention transfer, 2 layers; "
            "the hand-written step registers its hooks once):",
            "",
            *_report_section(result["features"], result["threads"], result["allocator"]),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = add_mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown")
    parser.add_argument("--only", choices=SECTIONS, default=None, help="measure one step only")
    args = add_allocator_arg(parser).parse_args(argv)
    result = run(mode_of(args), args.threads, args.profile, args.only, not args.default_allocator)
    write_json(result, args.json)
    print(report(result), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
