"""kdkit.evaluation: metrics against hand-computed answers."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdkit import evaluation
from kdkit.evaluation import (
    count_parameters,
    evaluate,
    gap_closed,
    measure_latency,
    metrics_from_logits,
    predict,
    size_on_disk,
)

# Four samples, two classes. Probability of class 0 per sample, and the labels:
#   sample 0: p0=0.90 -> predicts 0, label 0 (right), confidence 0.90
#   sample 1: p0=0.90 -> predicts 0, label 1 (wrong), confidence 0.90
#   sample 2: p0=0.38 -> predicts 1, label 1 (right), confidence 0.62
#   sample 3: p0=0.70 -> predicts 0, label 0 (right), confidence 0.70
P0 = torch.tensor([0.90, 0.90, 0.38, 0.70])
LABELS = torch.tensor([0, 1, 1, 0])
LOGITS = torch.stack([P0.log(), (1 - P0).log()], dim=1)
# Teacher predicts [0, 1, 0, 0]; the student predicts [0, 0, 1, 0]: they agree on 2 of 4.
TEACHER_LOGITS = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0], [5.0, 4.0]])


class LookupModel(nn.Module):
    """Returns fixed logits for the sample index it is given; records the mode it ran in."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.scale = nn.Parameter(torch.ones(()))
        self.seen_training: list[bool] = []

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.table[index.long()] * self.scale


def _loader(batch_size: int = 3, with_index: bool = False) -> DataLoader:
    tensors = [torch.arange(4), LABELS]
    if with_index:
        tensors.append(torch.arange(4))
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


def test_predict_concatenates_batches_and_restores_mode() -> None:
    model = LookupModel(LOGITS)
    model.train()
    logits, targets = predict(model, _loader(batch_size=3, with_index=True))
    torch.testing.assert_close(logits, LOGITS)
    assert targets.tolist() == LABELS.tolist()
    assert model.seen_training == [False, False]  # two batches (3 + 1), both in eval mode
    assert model.training is True


def test_predict_accepts_tuple_and_dict_outputs() -> None:
    class TupleOut(LookupModel):
        def forward(self, index):  # type: ignore[override]
            return super().forward(index), "aux"

    class DictOut(LookupModel):
        def forward(self, index):  # type: ignore[override]
            return {"logits": super().forward(index)}

    for cls in (TupleOut, DictOut):
        logits, _ = predict(cls(LOGITS), _loader())
        torch.testing.assert_close(logits, LOGITS)


def test_predict_rejects_bad_batches() -> None:
    with pytest.raises(TypeError, match=r"must be \(inputs, labels\) or \(inputs, labels, index\)"):
        predict(LookupModel(LOGITS), [torch.arange(4)])
    with pytest.raises(ValueError, match="no batches"):
        predict(LookupModel(LOGITS), [])


def test_evaluate_known_values() -> None:
    metrics = evaluate(LookupModel(LOGITS), _loader(), teacher_logits=TEACHER_LOGITS)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["agreement"] == pytest.approx(0.5)
    assert metrics["num_samples"] == 4
    # Hand NLL: -mean log p(label).
    expected_nll = -(math.log(0.9) + math.log(0.1) + math.log(0.62) + math.log(0.7)) / 4
    assert metrics["nll"] == pytest.approx(expected_nll, rel=1e-5)
    # Hand ECE with 15 bins of width 1/15:
    #   bin [0.867, 0.933): samples 0, 1 -> acc 0.5, conf 0.90, weight 2/4 -> 0.5 * 0.40 = 0.200
    #   bin [0.600, 0.667): sample 2     -> acc 1.0, conf 0.62, weight 1/4 -> 0.25 * 0.38 = 0.095
    #   bin [0.667, 0.733): sample 3     -> acc 1.0, conf 0.70, weight 1/4 -> 0.25 * 0.30 = 0.075
    assert metrics["ece"] == pytest.approx(0.370, abs=1e-5)


def test_evaluate_without_teacher_and_single_bin() -> None:
    metrics = evaluate(LookupModel(LOGITS), _loader(), num_bins=1)
    assert metrics["agreement"] is None
    # One bin: |mean accuracy - mean confidence| = |0.75 - (0.9 + 0.9 + 0.62 + 0.7) / 4| = 0.03.
    assert metrics["ece"] == pytest.approx(0.03, abs=1e-5)


def test_metrics_from_logits_perfectly_confident_and_right() -> None:
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]])
    metrics = metrics_from_logits(logits, torch.tensor([0, 1, 2]), teacher_logits=logits)
    assert metrics["accuracy"] == 1.0
    assert metrics["agreement"] == 1.0
    assert metrics["ece"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["nll"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_rejects_mismatched_teacher_logits() -> None:
    with pytest.raises(ValueError, match=r"teacher_logits: got shape \(3, 2\)"):
        evaluate(LookupModel(LOGITS), _loader(), teacher_logits=TEACHER_LOGITS[:3])


def test_count_parameters() -> None:
    linear = nn.Linear(3, 2)  # 3*2 weights + 2 biases
    assert count_parameters(linear) == 8
    assert count_parameters(nn.Sequential(linear, nn.ReLU(), linear)) == 8  # shared: counted once
    frozen = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 5))
    frozen[0].requires_grad_(False)
    assert count_parameters(frozen) == 8 + 15
    assert count_parameters(frozen, trainable_only=True) == 15


def test_size_on_disk_matches_torch_save() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.Linear(128, 10))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    size = size_on_disk(model)
    assert size == len(buffer.getvalue())
    assert size > 4 * count_parameters(model)  # float32 weights plus BatchNorm buffers


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0


def test_measure_latency_reports_median_in_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _FakeClock()
    calls: list[int] = []

    # torch's Timer: timeit(n) runs 2 untimed calls, then n timed ones. Per batch size:
    # timeit(warmup=2) -> 4 calls, then repeats=5 x timeit(1) -> 5 x 3 calls.
    per_size = 4 + 5 * 3
    first_timed_batch_run = per_size + 4 + 3

    class Timed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            # 2 ms per sample, except that one timed batch run is a 1-second outlier.
            extra = 1.0 if len(calls) == first_timed_batch_run else 0.0
            clock.now += 0.002 * x.shape[0] + extra
            return x

    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: clock.now)
    threads_before = torch.get_num_threads()
    model = Timed().train()
    result = measure_latency(model, (torch.zeros(5, 3), torch.zeros(5)), repeats=5, warmup=2)
    assert result["latency_ms_per_sample"] == pytest.approx(2.0)
    assert result["latency_ms_per_batch"] == pytest.approx(10.0)  # median ignores the outlier
    assert calls == [1] * per_size + [5] * per_size  # warmup + repeats for each batch size
    assert result["batch_size"] == 5
    assert result["num_threads"] == 1
    assert result["device"] == "cpu"
    assert torch.get_num_threads() == threads_before
    assert model.training is True


def test_measure_latency_real_model_positive() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    result = measure_latency(model, torch.randn(16, 64), repeats=3, warmup=1, num_threads=2)
    assert result["latency_ms_per_sample"] > 0
    assert result["latency_ms_per_batch"] > 0
    assert result["num_threads"] == 2


def test_measure_latency_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(nn.Identity(), torch.zeros(2, 2), repeats=0)
    with pytest.raises(TypeError, match="example_batch"):
        measure_latency(nn.Identity(), "not a tensor")


@pytest.mark.parametrize(
    ("teacher", "scratch", "distilled", "expected"),
    [
        (0.90, 0.70, 0.80, 0.5),
        (0.90, 0.70, 0.70, 0.0),
        (0.90, 0.70, 0.90, 1.0),
        (0.90, 0.70, 0.95, 1.25),
        (0.90, 0.70, 0.60, -0.5),
    ],
)
def test_gap_closed_known_values(teacher, scratch, distilled, expected) -> None:
    assert gap_closed(teacher, scratch, distilled) == pytest.approx(expected)


@pytest.mark.parametrize(
    "args",
    [(0.7, 0.7, 0.8), (0.6, 0.7, 0.8), (None, 0.7, 0.8), (0.9, float("nan"), 0.8)],
)
def test_gap_closed_undefined_is_none(args) -> None:
    assert gap_closed(*args) is None


def test_predict_rejects_outputs_without_logits() -> None:
    class NoLogits(LookupModel):
        def forward(self, index):  # type: ignore[override]
            return {"hidden": [super().forward(index)]}

    with pytest.raises(TypeError, match=r"list.*selector"):
        predict(NoLogits(LOGITS), _loader())
