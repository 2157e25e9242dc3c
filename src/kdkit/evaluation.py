"""Measure a trained model: accuracy, agreement with the teacher, calibration, size, latency.

Pure measurement: plain PyTorch and torchmetrics, no Lightning. Every function leaves the model
in the train/eval mode it found it in.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
)

from kdkit.batch import call_model, first_rows, to_device, unpack_batch
from kdkit.capture import select_tensor
from kdkit.models.registry import count_parameters

__all__ = [
    "count_parameters",
    "evaluate",
    "gap_closed",
    "measure_latency",
    "metrics_from_logits",
    "predict",
    "size_on_disk",
]


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def predict(model: nn.Module, dataloader: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``dataloader`` and return ``(logits [N, C], targets [N])`` on the CPU.

    Batches are ``(x, y)`` or ``(x, y, index)``. The model runs in eval mode under
    ``torch.no_grad()``; its previous mode is restored afterwards. Inputs are moved to the
    device of the model's first parameter. Order follows the dataloader, so use an unshuffled
    loader when the logits are to be compared with a teacher's.
    """
    device = _model_device(model)
    was_training = model.training
    logits_list: list[Tensor] = []
    target_list: list[Tensor] = []
    model.eval()
    try:
        with torch.no_grad():
            for batch in dataloader:
                inputs, targets, _ = unpack_batch(batch)
                logits = select_tensor(call_model(model, to_device(inputs, device)))
                logits_list.append(logits.detach().float().cpu())
                target_list.append(torch.as_tensor(targets).cpu())
    finally:
        model.train(was_training)
    if not logits_list:
        raise ValueError(
            "dataloader: got no batches; expected at least one. Fix: pass a non-empty dataloader."
        )
    return torch.cat(logits_list), torch.cat(target_list)


def evaluate(
    model: nn.Module,
    dataloader: Iterable[Any],
    teacher_logits: Tensor | None = None,
    num_bins: int = 15,
) -> dict[str, Any]:
    """Evaluate a classifier on ``dataloader``.

    Returns a dict with

    - ``accuracy``: top-1 accuracy in [0, 1] (torchmetrics ``multiclass_accuracy``, micro).
    - ``agreement``: share of samples where the model's top-1 class equals the teacher's
      (``argmax teacher_logits``), or ``None`` when ``teacher_logits`` is not given.
      ``teacher_logits`` [N, C] must be in the dataloader's order.
    - ``ece``: expected calibration error, ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over
      ``num_bins`` equal-width confidence bins (L1 norm; Guo et al. 2017, "On Calibration of
      Modern Neural Networks"), computed by torchmetrics ``multiclass_calibration_error``.
    - ``nll``: mean negative log-likelihood ``-mean_i log softmax(z_i)[y_i]``.
    - ``num_samples``: N.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins: got {num_bins}; expected an integer >= 1 (15 is standard).")
    logits, targets = predict(model, dataloader)
    return metrics_from_logits(logits, targets, teacher_logits=teacher_logits, num_bins=num_bins)


def metrics_from_logits(
    logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None = None,
    num_bins: int = 15,
) -> dict[str, Any]:
    """The metrics of :func:`evaluate` from precomputed ``logits`` [N, C] and ``targets`` [N]."""
    if logits.ndim != 2:
        raise ValueError(
            f"logits: got shape {tuple(logits.shape)}; expected [N, C]. "
            "Fix: flatten token logits to [N, C] before evaluating."
        )
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"targets: got shape {tuple(targets.shape)} for logits {tuple(logits.shape)}; "
            "expected [N] class indices."
        )
    logits = logits.float()
    targets = targets.long()
    num_classes = logits.shape[1]
    accuracy = multiclass_accuracy(logits, targets, num_classes=num_classes, average="micro")
    ece = multiclass_calibration_error(
        logits.softmax(dim=-1), targets, num_classes=num_classes, n_bins=num_bins, norm="l1"
    )
    nll = F.cross_entropy(logits, targets)
    agreement: float | None = None
    if teacher_logits is not None:
        teacher_logits = torch.as_tensor(teacher_logits).detach().cpu()
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"teacher_logits: got shape {tuple(teacher_logits.shape)}; expected "
                f"{tuple(logits.shape)} (the student's logits: same dataloader, same order)."
            )
        teacher_top1 = teacher_logits.argmax(dim=-1)
        agreement = float(
            multiclass_accuracy(logits, teacher_top1, num_classes=num_classes, average="micro")
        )
    return {
        "accuracy": float(accuracy),
        "agreement": agreement,
        "ece": float(ece),
        "nll": float(nll),
        "num_samples": int(logits.shape[0]),
    }


def size_on_disk(model: nn.Module) -> int:
    """Bytes taken by ``torch.save(model.state_dict())`` (weights and buffers, as shipped)."""
    fd, tmp = tempfile.mkstemp(suffix=".pt", prefix="kdkit-size-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(model.state_dict(), f)
        return os.path.getsize(tmp)
    finally:
        os.unlink(tmp)


def _first_input(example_batch: Any) -> Tensor | dict[str, Tensor]:
    """The inputs of ``example_batch``: a tensor ``[B, ...]``, or a dict of keyword tensors
    ``[B, ...]`` (a Hugging Face batch; its ``labels`` and ``index`` left out)."""
    if isinstance(example_batch, Mapping):
        inputs = unpack_batch(example_batch)[0] if "labels" in example_batch else example_batch
        tensors = {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
        if tensors and all(v.ndim >= 1 for v in tensors.values()):
            return tensors
    if isinstance(example_batch, (tuple, list)) and example_batch:
        example_batch = example_batch[0]
    if not isinstance(example_batch, Tensor) or example_batch.ndim < 1:
        raise TypeError(
            f"example_batch: got {type(example_batch).__name__}; expected a Tensor batch [B, ...], "
            "a dict of keyword tensors [B, ...] (input_ids, attention_mask, ...) or an (inputs, "
            "targets) tuple from a dataloader."
        )
    return example_batch


def _median_ms(
    model: nn.Module, x: Tensor | dict[str, Tensor], repeats: int, warmup: int, num_threads: int
) -> float:
    # torch's Timer sets (and restores) the thread count and synchronises CUDA; each timeit(1)
    # is one timed run after its own two untimed ones.
    benchmark = _benchmark()
    call = "model(**x)" if isinstance(x, Mapping) else "model(x)"
    timer = benchmark.Timer(
        call, globals={"model": model, "x": x}, num_threads=num_threads, timer=_clock
    )
    if warmup:
        timer.timeit(warmup)
    runs = benchmark.Measurement.merge([timer.timeit(1) for _ in range(repeats)])
    return runs[0].median * 1000.0


def _benchmark() -> Any:
    # Importing torch.utils.benchmark imports cpp_extension, which logs a warning about the
    # CUDA toolkit on machines without a CUDA runtime; irrelevant to a CPU timing.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        cpp_logger.setLevel(level)
    return benchmark


def _clock() -> float:
    return time.perf_counter()  # looked up at each call, so a test can replace it


def measure_latency(
    model: nn.Module,
    example_batch: Any,
    repeats: int = 20,
    warmup: int = 3,
    num_threads: int = 1,
) -> dict[str, Any]:
    """CPU inference latency: median over ``repeats`` timed runs after ``warmup`` untimed ones.

    Measures one sample (``example_batch[:1]``) and the whole batch with
    ``torch.utils.benchmark.Timer`` (each timed run follows the Timer's own two untimed ones),
    in eval mode under ``torch.no_grad()`` with ``num_threads`` intra-op threads (restored
    afterwards); one thread by default, so numbers are comparable across machines and runs. A
    model on another device is measured on a CPU copy. Returns ``latency_ms_per_sample``,
    ``latency_ms_per_batch``, ``batch_size``, ``num_threads``, ``repeats``, ``warmup`` and
    ``device`` ("cpu").
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"repeats/warmup: got repeats={repeats}, warmup={warmup}; expected repeats >= 1 and "
            "warmup >= 0."
        )
    if num_threads < 1:
        raise ValueError(f"num_threads: got {num_threads}; expected an integer >= 1.")
    batch = apply_to_collection(_first_input(example_batch), Tensor, lambda t: t.detach().cpu())
    rows = next(iter(batch.values())) if isinstance(batch, Mapping) else batch
    cpu_model = model
    if _model_device(model).type != "cpu":
        import copy

        # Copy rather than move: the caller's model must stay where it is.
        cpu_model = copy.deepcopy(model).cpu()
    was_training = cpu_model.training
    cpu_model.eval()
    try:
        with torch.no_grad():
            per_sample = _median_ms(cpu_model, first_rows(batch, 1), repeats, warmup, num_threads)
            per_batch = _median_ms(cpu_model, batch, repeats, warmup, num_threads)
    finally:
        cpu_model.train(was_training)
    return {
        "latency_ms_per_sample": per_sample,
        "latency_ms_per_batch": per_batch,
        "batch_size": int(rows.shape[0]),
        "num_threads": num_threads,
        "repeats": repeats,
        "warmup": warmup,
        "device": "cpu",
    }


def gap_closed(
    teacher_acc: float | None, scratch_acc: float | None, distilled_acc: float | None
) -> float | None:
    """Share of the teacher–scratch accuracy gap closed by distillation.

    ``(distilled - scratch) / (teacher - scratch)``: 0 means no better than the student trained
    from scratch, 1 means as good as the teacher; values below 0 or above 1 are returned as is.
    Returns ``None`` when any accuracy is missing or not finite, or when ``teacher <= scratch``
    (there is no gap to close, so the ratio has no meaning).
    """
    values: Sequence[float | None] = (teacher_acc, scratch_acc, distilled_acc)
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    assert teacher_acc is not None and scratch_acc is not None and distilled_acc is not None
    if teacher_acc <= scratch_acc:
        return None
    return (distilled_acc - scratch_acc) / (teacher_acc - scratch_acc)
