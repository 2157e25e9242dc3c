"""Smoke tests of benchmarks/: each script's tiny mode runs and returns sane numbers.

No timing is asserted (times depend on the machine and its load); the tests check that every
number a benchmark returns is finite, that its key measurements are positive, and a few facts
that do not depend on speed (the same KD gives the same first loss in kdkit and torchdistill,
the dense cache is bigger than top-1, the report renders).
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

common = importlib.import_module("common")


def _check_finite(result: dict) -> None:
    numbers = common.finite_numbers(result)
    assert numbers, "the benchmark returned no numbers"
    assert all(math.isfinite(v) for v in numbers), result


def _positive_summary(stats: dict) -> None:
    assert stats["n"] >= 1
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]


def test_common_helpers_known_answers() -> None:
    calls: list[str] = []
    times = common.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating order
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    s = common.summary([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"]) == (3.0, 2.0, 4.0, 1.0, 5.0)
    r = common.paired_ratio([2.0, 3.0, 8.0], [1.0, 3.0, 2.0])
    assert r["median"] == 2.0 and r["min"] == 1.0 and r["max"] == 4.0
    with pytest.raises(ValueError, match="equally long"):
        common.paired_ratio([1.0], [1.0, 2.0])
    assert common.finite_numbers({"a": [1, 2.5], "b": "x", "c": True, "d": None}) == [1.0, 2.5]
    assert common.peak_rss_mib() > 0


def test_overhead_smoke() -> None:
    result = importlib.import_module("overhead").run("smoke", profile=True)
    _check_finite(result)
    _positive_summary(result["step_s"]["hand"])
    _positive_summary(result["step_s"]["kdkit"])
    _positive_summary(result["ratio_kdkit_over_hand"])
    assert result["profile"]["kdkit_ops_per_step"] > 0
    assert "ratio kdkit / hand" in importlib.import_module("overhead").report(result)


def test_overhead_feature_step_smoke() -> None:
    overhead = importlib.import_module("overhead")
    result = overhead.run("smoke", profile=True, only="features")
    _check_finite(result)
    assert "ratio_kdkit_over_hand" not in result  # the logit step was not measured
    features = result["features"]
    _positive_summary(features["step_s"]["hand"])
    _positive_summary(features["step_s"]["kdkit"])
    _positive_summary(features["ratio_kdkit_over_hand"])
    # Same weights (adapters copied from the Distiller's), same batch, same three losses.
    first = features["first_loss"]
    assert first["kdkit"] == pytest.approx(first["hand"], rel=1e-5, abs=1e-6)
    # The same work: the Distiller's op count is within 2% of the hand step's (its checks add
    # a few ops, its fused reductions save a few).
    kdkit_ops = features["profile"]["kdkit_ops_per_step"]
    assert kdkit_ops == pytest.approx(features["profile"]["hand_ops_per_step"], rel=0.02)
    text = overhead.report(result)
    assert "Feature step" in text and "Logit step" not in text
    with pytest.raises(ValueError, match="only must be one of"):
        overhead.run("smoke", only="feature")


def test_cache_speed_smoke() -> None:
    result = importlib.import_module("cache_speed").run("smoke")
    _check_finite(result)
    for name in ("student_only", "cached", "online"):
        _positive_summary(result["epoch_s"][name])
    _positive_summary(result["ratio_cached_over_student_only"])
    assert result["cache_bytes_per_sample"] == 4 * 10  # dense float32, 10 classes, 1 view
    assert result["cache_build_s"] > 0


def test_topk_cache_smoke() -> None:
    result = importlib.import_module("topk_cache").run("smoke")
    _check_finite(result)
    rows = {row["cache"]: row for row in result["rows"]}
    assert rows["dense"]["bytes_per_sample"] == 40
    # top-1: fp16 log-prob (2) + int16 index (2) + float32 tail (4) bytes
    assert rows["top1"]["bytes_per_sample"] == 8
    for row in rows.values():
        assert 0 < row["test_acc_mean"] <= 1
    assert 0 < result["teacher_test_acc"] <= 1


def test_gpu_throughput_smoke() -> None:
    gpu = importlib.import_module("gpu_throughput")
    result = gpu.run("smoke")
    if result["measured"]:
        _check_finite(result)
        _positive_summary(result["images_per_s"]["kdkit"])
        _positive_summary(result["ratio_kdkit_time_over_floor"])
    else:
        assert result["reason"] == gpu.NO_GPU
        assert gpu.NO_GPU in gpu.report(result)


def test_vs_torchdistill_skips_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    vs = importlib.import_module("vs_torchdistill")
    monkeypatch.setattr(vs, "find_td_python", lambda explicit=None: (None, "not measured: x"))
    result = vs.run("smoke")
    assert result == {
        "benchmark": "vs_torchdistill",
        "mode": "smoke",
        "threads": result["threads"],
        "measured": False,
        "reason": "not measured: x",
    }
    assert vs.report(result) == "- not measured: x"


@pytest.mark.slow
def test_vs_torchdistill_smoke() -> None:
    vs = importlib.import_module("vs_torchdistill")
    python, why = vs.find_td_python()
    if python is None:
        pytest.skip(why)
    result = vs.run("smoke", td_python=python)
    _check_finite(result)
    timing = result["timing"]
    _positive_summary(timing["ratio_kdkit_over_torchdistill"])
    # Same models, same batch, same KD formula: the first losses agree.
    assert timing["first_loss_abs_diff"] < 1e-4
    # The op counts are the load-free measure next to the times.
    assert timing["ops_per_step"]["kdkit"] > 0 and timing["ops_per_step"]["torchdistill"] > 0
    assert "torch ops per step" in vs.report(result)
    assert result["ratio_peak_rss_kdkit_over_torchdistill"] > 0
    for fw in ("kdkit", "torchdistill"):
        assert result["memory"][fw]["peak_rss_mib"] > 0


def test_run_all_renders_report(tmp_path: Path) -> None:
    run_all = importlib.import_module("run_all")
    fake = {
        "gpu_throughput": {
            "benchmark": "gpu_throughput",
            "measured": False,
            "reason": "not measured: no GPU in this session",
            "wall_s": 1.0,
        },
        "overhead": {"benchmark": "overhead", "error": "boom", "wall_s": 2.0},
    }
    meta = {
        "command": "python benchmarks/run_all.py --smoke",
        "mode": "smoke",
        "date": "2026-01-01 00:00 UTC",
        "commit": "abc",
        "machine": common.machine_info(),
        "speed_options": "",
        "load_before": 0.5,
        "load_after": 0.7,
        "wall_s": 3.0,
    }
    text = run_all.render(fake, meta)
    assert "not measured: no GPU in this session" in text
    assert "FAILED" in text and "boom" in text
    assert text.count("- not run") == 3  # cache_speed, vs_torchdistill, topk_cache


@pytest.mark.slow
def test_gpu_throughput_code_path_on_cpu() -> None:
    # The CUDA benchmark's code run on the CPU with a tiny batch: checks the script, not speed.
    result = importlib.import_module("gpu_throughput").run("smoke", device="cpu")
    _check_finite(result)
    assert result["measured"] and result["config"]["batch"] == 2
    _positive_summary(result["images_per_s"]["kdkit"])
    _positive_summary(result["images_per_s"]["floor"])


def test_run_all_keeps_the_sections_other_scripts_wrote():
    import run_all

    old = (
        "# kdkit benchmarks\n\n## The run\n\n- old\n\n"
        "## 1. Distiller step overhead vs a hand-written loop\n\n- old numbers\n\n"
        "## Token losses: memory and time\n\n- kept 1\n\n"
        "## Threads: `kdkit run` on 1 vs 2 intra-op threads\n\n- kept 2\n"
    )
    kept = run_all.other_sections(old)
    assert kept == (
        "\n## Token losses: memory and time\n\n- kept 1\n"
        "\n## Threads: `kdkit run` on 1 vs 2 intra-op threads\n\n- kept 2\n"
    )
