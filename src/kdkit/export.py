"""Ship the student: ONNX (checked in onnxruntime) and TorchScript export.

A Hugging Face model is exported from a dict batch (``{"input_ids": ..., "attention_mask":
...}``): the file's inputs are named after the keys, its one output is the logits (read from the
model's ``ModelOutput``), and the batch and sequence axes are dynamic, checked in onnxruntime on
a batch of another size and length than the export's.

ONNX uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, the
default since PyTorch 2.9; it needs ``onnxscript``). Models it cannot capture fall back to the
legacy TorchScript-based exporter with a warning. Files are written atomically and, for ONNX,
only after the onnxruntime check has passed.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.atomic import atomic_path
from kdkit.capture import select_tensor

__all__ = [
    "ExportMismatchError",
    "ExportedPath",
    "check_onnx",
    "export_onnx",
    "export_torchscript",
]

_INSTALL_HINT = "Install the export extras: pip install 'kdkit[export]'"


class ExportMismatchError(RuntimeError):
    """The exported model's outputs differ from the eager PyTorch model's beyond tolerance."""


class ExportedPath(type(Path())):  # type: ignore[misc]  # PosixPath / WindowsPath
    """The path of a written export file, with the result of its check.

    A :class:`pathlib.Path` in every respect; ``max_abs_diff`` is the largest absolute
    difference between the exported and the eager model over the checked batches (None when
    the file was not checked).
    """

    max_abs_diff: float | None = None


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"kdkit.export needs the '{module}' package, which is not installed. {_INSTALL_HINT}"
        ) from exc


class KeywordModel(nn.Module):
    """``model`` called with keyword arguments (a Hugging Face model) as a module of positional
    tensors, in the order of ``names``, that returns only the logits: the form the exporters
    trace."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return select_tensor(self.model(**dict(zip(self.names, tensors, strict=True))))


def _positional(model: nn.Module, example_input: Any) -> tuple[nn.Module, Any, list[str] | None]:
    """``(model, inputs, names)``: a dict example becomes its tensors, in order, with the model
    wrapped in :class:`KeywordModel` and the keys as input names; anything else is unchanged
    (names None)."""
    if not isinstance(example_input, Mapping):
        return model, example_input, None
    names = list(example_input)
    return KeywordModel(model, names), tuple(example_input[n] for n in names), names


def _as_inputs(example_input: Any) -> tuple[Tensor, ...]:
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not all(isinstance(x, Tensor) and x.ndim >= 1 for x in inputs):
        kinds = [type(x).__name__ for x in inputs]
        raise TypeError(
            f"example_input: got {kinds if len(kinds) != 1 else kinds[0]}; expected a Tensor "
            "batch [B, ...] or a tuple of Tensor batches (one per forward argument)."
        )
    sizes = {x.shape[0] for x in inputs}
    if len(sizes) != 1:
        raise ValueError(
            f"example_input: got batch sizes {sorted(sizes)}; expected one batch size shared by "
            "every input."
        )
    return inputs


def _as_outputs(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and all(isinstance(o, Tensor) for o in output):
        return list(output)
    raise TypeError(
        f"model output: got {type(output).__name__}; export supports a Tensor or a tuple/list of "
        "Tensors. Fix: wrap the model so that forward returns tensors (e.g. only the logits)."
    )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _quiet_jit_deprecation() -> Iterator[None]:
    # torch >= 2.10 marks torch.jit as deprecated with FutureWarnings on every call. The user
    # asked for TorchScript explicitly, so repeating the warning on each call adds nothing.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=r"The feature will be removed")
        yield


def _other_batch(inputs: Sequence[Tensor], sequence: bool = False) -> tuple[Tensor, ...]:
    # A batch size that differs from the export's and reorders rows, so a graph that baked in
    # the batch dimension or mixed samples is caught; with `sequence`, also one token shorter
    # (a graph that baked in the sequence length is caught too).
    other = tuple(torch.cat([x.flip(0), x[:1]]) for x in inputs)
    if sequence:
        other = tuple(x[:, : max(1, x.shape[1] - 1)] for x in other)
    return other


def _eager(model: nn.Module, inputs: Sequence[Tensor]) -> list[Tensor]:
    with _eval_mode(model), torch.no_grad():
        return [o.detach().cpu() for o in _as_outputs(model(*inputs))]


def _max_abs_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[float, int]:
    worst, worst_index = 0.0, 0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            return float("inf"), i
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        if diff > worst or diff != diff:
            worst, worst_index = diff, i
    return worst, worst_index


def check_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    example_input: Any,
    *,
    atol: float = 1e-4,
) -> float:
    """Run the ONNX file in onnxruntime (CPU) and compare with ``model`` in eval mode.

    Returns the max absolute difference over all outputs; raises :class:`ExportMismatchError`
    when it exceeds ``atol`` or the output count/shapes differ. A dict ``example_input`` is fed
    by name (the file's inputs are named after its keys, as :func:`export_onnx` writes them).
    """
    ort = _require("onnxruntime")
    model, example_input, _ = _positional(model, example_input)
    inputs = _as_inputs(example_input)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ExportMismatchError(
            f"ONNX model {path}: expects {len(names)} inputs {names}; got {len(inputs)} example "
            "inputs."
        )
    feed = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs, strict=True)}
    got = [torch.from_numpy(o) for o in session.run(None, feed)]
    expected = _eager(model, inputs)
    if len(got) != len(expected):
        raise ExportMismatchError(
            f"ONNX model {path}: {len(got)} outputs; the PyTorch model returns {len(expected)}."
        )
    diff, index = _max_abs_diff(got, expected)
    if not diff <= atol:
        shapes = f"{tuple(got[index].shape)} vs {tuple(expected[index].shape)}"
        raise ExportMismatchError(
            f"ONNX model {path}: onnxruntime output {index} differs from PyTorch by max abs diff "
            f"{diff:.3g} > atol={atol:g} (batch size {inputs[0].shape[0]}, shapes {shapes}). "
            "Fix: check for ops that behave differently in eval mode or with another batch size "
            "(try dynamic_batch=False), or pass a larger atol if the difference is rounding."
        )
    return diff


def _export_dynamo(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    tmp: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    dynamic_batch: bool,
    dynamic_sequence: bool,
) -> None:
    _require("onnxscript")
    dynamic_shapes = None
    if dynamic_batch or dynamic_sequence:
        axes = {0: torch.export.Dim("batch")} if dynamic_batch else {}
        if dynamic_sequence:
            axes[1] = torch.export.Dim("sequence")
        dynamic_shapes = tuple(dict(axes) for _ in inputs)
        if isinstance(model, KeywordModel):
            dynamic_shapes = (dynamic_shapes,)  # one entry: its forward's *tensors
    program = torch.onnx.export(
        model,
        inputs,
        None,
        dynamo=True,
        verbose=False,
        input_names=input_names,
        output_names=output_names,
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
    )
    # One self-contained file: external data would tie the weights to the temp file's name.
    program.save(tmp, external_data=False)


def _export_legacy(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    tmp: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    dynamic_batch: bool,
    dynamic_sequence: bool,
) -> None:
    dynamic_axes = None
    if dynamic_batch or dynamic_sequence:
        batch = {0: "batch"} if dynamic_batch else {}
        sequence = {1: "sequence"} if dynamic_sequence else {}
        dynamic_axes = {n: {**batch, **sequence} for n in input_names}
        dynamic_axes.update({n: dict(batch) for n in output_names})
    with _quiet_jit_deprecation():
        torch.onnx.export(
            model,
            inputs,
            tmp,
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamic_axes=dynamic_axes,
        )


def export_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    *,
    check: bool = True,
    atol: float = 1e-4,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_sequence: bool | None = None,
    exporter: str = "auto",
) -> ExportedPath:
    """Export ``model`` (in eval mode) to ONNX at ``path`` and return the path.

    ``example_input`` is a Tensor batch, a tuple of them (one per forward argument) or a dict of
    them (keyword arguments, a Hugging Face model's ``input_ids`` / ``attention_mask``: the
    inputs are named after the keys and the one output, ``logits``, is taken from the model's
    output). With ``dynamic_batch`` the first dimension of every input and output is symbolic
    (``batch``); with ``dynamic_sequence`` (default: True for a dict example, else False) the
    second dimension of every input is too (``sequence``), and the check also runs on a shorter
    sequence.
    ``exporter``: ``"dynamo"`` (``torch.export``-based), ``"legacy"`` (TorchScript-based,
    deprecated upstream) or ``"auto"`` (dynamo, then legacy with a warning if dynamo fails).
    With ``check`` the file is run in onnxruntime on ``example_input`` and, if the batch is
    dynamic, on a batch of another size; an :class:`ExportMismatchError` (max abs diff > ``atol``)
    leaves ``path`` unwritten; the returned path's ``max_abs_diff`` is the largest difference
    the check measured. Inputs named ``input`` / ``input_{i}`` (a dict's keys), outputs
    ``output`` / ``output_{i}`` (``logits``). Files above 2 GB (protobuf limit) are not
    supported.
    """
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ValueError(f"exporter: got {exporter!r}; expected 'auto', 'dynamo' or 'legacy'.")
    if not atol >= 0:
        raise ValueError(f"atol: got {atol}; expected a tolerance >= 0 (default 1e-4).")
    onnx = _require("onnx")
    if check:
        _require("onnxruntime")
    if dynamic_sequence is None:
        dynamic_sequence = isinstance(example_input, Mapping)
    original = model
    model, example_input, names = _positional(model, example_input)
    inputs = _as_inputs(example_input)
    if dynamic_sequence and any(x.ndim < 2 for x in inputs):
        raise ValueError(
            f"dynamic_sequence=True makes dimension 1 of every input symbolic, but the inputs "
            f"have shapes {[tuple(x.shape) for x in inputs]}; pass [B, L] token inputs or "
            "dynamic_sequence=False."
        )
    eager_outputs = _eager(model, inputs)
    n_out = len(eager_outputs)
    if names:
        input_names, output_names = names, ["logits"]
    else:
        input_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
        output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    trace_inputs = inputs
    if dynamic_batch and inputs[0].shape[0] == 1:
        # torch.export specialises dimensions of size 1, so a batch-1 example would pin the batch.
        trace_inputs = tuple(torch.cat([x, x]) for x in inputs)

    final = Path(path)
    result = ExportedPath(final)
    with atomic_path(final) as tmp, _eval_mode(model):
        args = (
            model,
            trace_inputs,
            tmp,
            input_names,
            output_names,
            opset,
            dynamic_batch,
            dynamic_sequence,
        )
        if exporter == "legacy":
            _export_legacy(*args)
        else:
            try:
                _export_dynamo(*args)
            except ImportError:
                raise
            except Exception as exc:
                if exporter == "dynamo":
                    raise
                warnings.warn(
                    f"export_onnx: the torch.export-based exporter failed on "
                    f"{type(model).__name__} ({type(exc).__name__}: {str(exc)[:300]}); falling "
                    "back to the legacy TorchScript-based exporter.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                _export_legacy(*args)
        onnx.checker.check_model(os.fspath(tmp))
        if check:
            batches = [inputs]
            if dynamic_batch or dynamic_sequence:
                batches.append(_other_batch(inputs, sequence=dynamic_sequence))
            if names:
                batches = [dict(zip(names, b, strict=True)) for b in batches]
            result.max_abs_diff = max(check_onnx(tmp, original, b, atol=atol) for b in batches)
    return result


def export_torchscript(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    *,
    check: bool = True,
    atol: float = 1e-5,
) -> Path:
    """Trace ``model`` (eval mode) with ``torch.jit.trace`` and save it to ``path``.

    With ``check`` the trace is checked by ``torch.jit.trace`` itself (``check_inputs``): it is
    re-traced on ``example_input`` and on a batch of another size, and the graphs and outputs
    must agree with the eager model (within ``atol``); otherwise :class:`ExportMismatchError`
    is raised and ``path`` is left unwritten. A dict ``example_input`` (a Hugging Face model's
    keyword arguments) is traced as positional inputs in its key order, returning the logits.
    ``torch.jit`` is deprecated since PyTorch 2.10
    (its FutureWarnings are silenced here); prefer :func:`export_onnx` for deployment. Tracing
    records one path through the code: data-dependent control flow is frozen to the branch the
    example took.
    """
    if not hasattr(torch, "jit") or not hasattr(torch.jit, "trace"):
        raise RuntimeError(
            f"export_torchscript: torch {torch.__version__} has no torch.jit.trace. "
            "Fix: use kdkit.export.export_onnx instead."
        )
    model, example_input, _ = _positional(model, example_input)
    inputs = _as_inputs(example_input)
    final = Path(path)
    with atomic_path(final) as tmp, _eval_mode(model), _quiet_jit_deprecation():
        traced = _trace(model, inputs, final, atol) if check else _trace(model, inputs)
        torch.jit.save(traced, os.fspath(tmp))
    return final


def _trace(
    model: nn.Module, inputs: tuple[Tensor, ...], final: Path | None = None, atol: float = 0.0
) -> Any:
    """``torch.jit.trace``; with ``final`` (the file it is for) checked on two batch sizes."""
    if final is None:
        with torch.no_grad():
            return torch.jit.trace(model, inputs, check_trace=False)
    other = _other_batch(inputs)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch only warns when the outputs differ (it raises on a differing graph)
            warnings.filterwarnings("error", message="Output nr", category=torch.jit.TracerWarning)
            return torch.jit.trace(
                model, inputs, check_inputs=[inputs, other], check_tolerance=atol
            )
    except (torch.jit.TracingCheckError, torch.jit.TracerWarning) as exc:
        reason = str(exc).strip().splitlines()[0]
    got = _as_outputs(_trace(model, inputs)(*other))
    diff, index = _max_abs_diff([o.detach() for o in got], _eager(model, other))
    raise ExportMismatchError(
        f"TorchScript model for {final}: the trace does not reproduce the model on a batch of "
        f"size {other[0].shape[0]}: output {index} differs by max abs diff {diff:.3g} "
        f"(atol={atol:g}); torch.jit.trace: {reason}. Tracing froze a shape or branch; fix: make "
        "forward shape-agnostic, or use export_onnx."
    ) from None
