"""Smoke test of benchmarks/token_memory.py: the variants compare like with like, one fresh
process measures a positive extra peak, and the report renders (no timing asserted)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
token_memory = importlib.import_module("token_memory")


def test_variants_compute_the_divergences_they_claim():
    n, h, v = 16, 8, 40
    value = {name: token_memory.make_step(name, n, h, v)() for name in token_memory.NAIVE_OF}
    for name in ("kl_chunked", "kl_unchunked"):
        assert value[name] == pytest.approx(value["naive_kl"], rel=1e-5)
    for name in ("linear_then_kl_chunked", "fused_kl"):
        assert value[name] == pytest.approx(value["naive_linear_kl"], rel=1e-5)
    assert value["reverse_kl_chunked"] == pytest.approx(value["reverse_kl_unchunked"], rel=1e-6)
    assert value["jsd_chunked"] == pytest.approx(value["jsd_unchunked"], rel=1e-6)
    assert value["fused_jsd"] > 0
    for name in ("distiller_hf_kl", "distiller_hf_fused"):
        assert value[name] == pytest.approx(value["naive_hf_kl"], rel=1e-5)
    # 0.5 KL + 0.5 CE, the cross-entropy beside the fused term or inside it
    both = value["distiller_hf_fused_and_ce"]
    assert value["distiller_hf_fused_ce"] == pytest.approx(both, rel=1e-5)
    assert both != pytest.approx(0.5 * value["naive_hf_kl"], rel=1e-3)  # the CE is in it


def test_memory_is_measured_in_a_fresh_process_and_the_report_renders():
    memory = token_memory.measure_memory("kl_chunked", 256, 8, 4096, threads=1)
    assert memory["before_mib"] > 0 and memory["extra_mib"] >= 0
    row = {
        "extra_peak_mib": 4.0,
        "extra_peak_x_logits": 1.0,
        "extra_peak_vs_naive": 0.2,
        "time": {"median": 0.1, "q1": 0.1, "q3": 0.1, "min": 0.1, "max": 0.1, "n": 1},
        "time_vs_naive": {"median": 1.1, "q1": 1.1, "q3": 1.1, "min": 1.1, "max": 1.1, "n": 1},
    }
    result = {
        "mode": "smoke",
        "size": {"tokens": 256, "hidden": 8, "vocab": 4096, "dtype": "float32"},
        "logits_mib": 4.0,
        "chunk_size": "auto",
        "fused_chunk_size": "auto",
        "repeats": 1,
        "variants": {name: row for name in token_memory.NAIVE_OF},
        "goals": {
            "chunked_logit_losses_max_x_logits": 1.0,
            "fused_kl_memory_vs_naive": 0.2,
            "fused_kl_time_vs_naive": 1.1,
        },
        "load_average": [1.0, 1.0, 1.0],
        "torch_threads": 1,
        "machine": {"cpu": "cpu", "cores": 2, "torch": "2", "python": "3"},
        "wall_s": 1.0,
    }
    text = token_memory.report(result)
    assert text.startswith("## Token losses: memory and time")
    assert text.count("\n| ") == 2 + len(token_memory.NAIVE_OF)
    assert "goal <= 2: met" in text and "goal <= 0.25: met" in text
