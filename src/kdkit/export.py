"""Ship the student: ONNX (checked in onnxruntime) and TorchScript export.

ONNX uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, the
default since PyTorch 2.9; it needs ``onnxscript``). Models it cannot capture fall back to the
legacy TorchScript-based exporter with a warning. Files are written atomically and, for ONNX,
only after the onnxruntime check has passed.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.atomic import atomic_path

__all__ = ["ExportMismatchError", "check_onnx", "export_onnx", "export_torchscript"]

_INSTALL_HINT = "Install the export extras: pip install 'kdkit[export]'"


class ExportMismatchError(RuntimeError):
    """The exported model's outputs differ from the eager PyTorch model's beyond tolerance."""


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"kdkit.export needs the '{module}' package, which is not installed. {_INSTALL_HINT}"
        ) from exc


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


def _other_batch(inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    # A batch size that differs from the export's and reorders rows, so a graph that baked in
    # the batch dimension or mixed samples is caught.
    return tuple(torch.cat([x.flip(0), x[:1]]) for x in inputs)


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
    when it exceeds ``atol`` or the output count/shapes differ.
    """
    ort = _require("onnxruntime")
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
) -> None:
    _require("onnxscript")
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in inputs)
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
) -> None:
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in [*input_names, *output_names]}
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
    exporter: str = "auto",
) -> Path:
    """Export ``model`` (in eval mode) to ONNX at ``path`` and return the path.

    ``example_input`` is a Tensor batch or a tuple of them (one per forward argument). With
    ``dynamic_batch`` the first dimension of every input and output is symbolic (``batch``).
    ``exporter``: ``"dynamo"`` (``torch.export``-based), ``"legacy"`` (TorchScript-based,
    deprecated upstream) or ``"auto"`` (dynamo, then legacy with a warning if dynamo fails).
    With ``check`` the file is run in onnxruntime on ``example_input`` and, if the batch is
    dynamic, on a batch of another size; an :class:`ExportMismatchError` (max abs diff > ``atol``)
    leaves ``path`` unwritten. Inputs named ``input`` / ``input_{i}``, outputs ``output`` /
    ``output_{i}``. Files above 2 GB (protobuf limit) are not supported.
    """
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ValueError(f"exporter: got {exporter!r}; expected 'auto', 'dynamo' or 'legacy'.")
    if not atol >= 0:
        raise ValueError(f"atol: got {atol}; expected a tolerance >= 0 (default 1e-4).")
    onnx = _require("onnx")
    if check:
        _require("onnxruntime")
    inputs = _as_inputs(example_input)
    eager_outputs = _eager(model, inputs)
    input_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    n_out = len(eager_outputs)
    output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    trace_inputs = inputs
    if dynamic_batch and inputs[0].shape[0] == 1:
        # torch.export specialises dimensions of size 1, so a batch-1 example would pin the batch.
        trace_inputs = tuple(torch.cat([x, x]) for x in inputs)

    final = Path(path)
    with atomic_path(final) as tmp, _eval_mode(model):
        args = (model, trace_inputs, tmp, input_names, output_names, opset, dynamic_batch)
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
            check_onnx(tmp, model, inputs, atol=atol)
            if dynamic_batch:
                check_onnx(tmp, model, _other_batch(inputs), atol=atol)
    return final


def export_torchscript(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    *,
    check: bool = True,
    atol: float = 1e-5,
) -> Path:
    """Trace ``model`` (eval mode) with ``torch.jit.trace`` and save it to ``path``.

    With ``check`` the saved file is loaded back and compared with the eager model on
    ``example_input`` and on a batch of another size; a max abs diff above ``atol`` raises
    :class:`ExportMismatchError` and leaves ``path`` unwritten. ``torch.jit`` is deprecated
    since PyTorch 2.10 (its FutureWarnings are silenced here); prefer :func:`export_onnx`
    for deployment. Tracing records one path through the code: data-dependent control flow is
    frozen to the branch the example took.
    """
    if not hasattr(torch, "jit") or not hasattr(torch.jit, "trace"):
        raise RuntimeError(
            f"export_torchscript: torch {torch.__version__} has no torch.jit.trace. "
            "Fix: use kdkit.export.export_onnx instead."
        )
    inputs = _as_inputs(example_input)
    final = Path(path)
    with atomic_path(final) as tmp, _eval_mode(model), _quiet_jit_deprecation():
        with torch.no_grad():
            traced = torch.jit.trace(model, inputs, check_trace=True)
        torch.jit.save(traced, os.fspath(tmp))
        if check:
            loaded = torch.jit.load(os.fspath(tmp))
            for batch in (inputs, _other_batch(inputs)):
                with torch.no_grad():
                    got = [o.detach().cpu() for o in _as_outputs(loaded(*batch))]
                diff, index = _max_abs_diff(got, _eager(model, batch))
                if not diff <= atol:
                    raise ExportMismatchError(
                        f"TorchScript model for {final}: output {index} differs from eager "
                        f"PyTorch by max abs diff {diff:.3g} > atol={atol:g} (batch size "
                        f"{batch[0].shape[0]}). Tracing froze a shape or branch; fix: make "
                        "forward shape-agnostic, or use export_onnx."
                    )
    return final
