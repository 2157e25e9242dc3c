"""kdkit.export: ONNX (checked in onnxruntime) and TorchScript match eager PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdkit import export
from kdkit.export import ExportMismatchError, check_onnx, export_onnx, export_torchscript

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    # A few train-mode passes give BatchNorm running statistics that are not the identity, so
    # the export must use them (eval mode) for the outputs to match.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 12, 12) * 3 + 1)
    return model


def _ort_max_diff(path: Path, model: nn.Module, x: torch.Tensor) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model.eval()
    with torch.no_grad():
        expected = model(x)
    return (torch.from_numpy(out) - expected).abs().max().item()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = small_cnn()
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    assert export_onnx(model, torch.randn(4, 3, 12, 12), path) == path
    assert model.training is True  # mode restored after export
    return model, path


def test_onnx_matches_torch_in_onnxruntime(exported: tuple[nn.Module, Path]) -> None:
    model, path = exported
    generator = torch.Generator().manual_seed(1)
    for batch in (4, 1, 7):  # export batch, and others through the dynamic batch axis
        x = torch.randn(batch, 3, 12, 12, generator=generator)
        assert _ort_max_diff(path, model, x) <= 1e-4
    assert not path.with_name(path.name + ".data").exists()  # weights are inside the file
    assert [p.name for p in path.parent.iterdir()] == ["student.onnx"]


def test_onnx_graph_has_symbolic_batch(exported: tuple[nn.Module, Path]) -> None:
    session = ort.InferenceSession(str(exported[1]), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input"
    assert isinstance(inp.shape[0], str)  # symbolic, not a fixed size
    assert inp.shape[1:] == [3, 12, 12]


def test_check_onnx_reports_the_diff(exported: tuple[nn.Module, Path]) -> None:
    model, path = exported
    x = torch.randn(3, 3, 12, 12)
    assert check_onnx(path, model, x) <= 1e-4
    other = small_cnn()
    with torch.no_grad():
        other[-1].bias.add_(1.0)  # every logit shifted by exactly 1
    with pytest.raises(ExportMismatchError, match=r"max abs diff 1 > atol=0.0001") as info:
        check_onnx(path, other, x)
    assert "batch size 3" in str(info.value)


def test_batch_one_example_still_exports_dynamic_batch(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    path = export_onnx(model, torch.randn(1, 6), tmp_path / "mlp.onnx")
    assert _ort_max_diff(path, model, torch.randn(5, 6)) <= 1e-4


def test_failed_check_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def mismatch(*args, **kwargs) -> float:
        raise ExportMismatchError("simulated mismatch")

    monkeypatch.setattr(export, "check_onnx", mismatch)
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportMismatchError, match="simulated"):
        export_onnx(nn.Linear(4, 2), torch.randn(2, 4), target)
    assert list(tmp_path.iterdir()) == []  # neither the final file nor the temporary one


def test_missing_onnx_suggests_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'kdkit\[export\]'"):
        export_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_legacy_exporter_matches(tmp_path: Path) -> None:
    model = small_cnn()
    path = export_onnx(
        model, torch.randn(2, 3, 12, 12), tmp_path / "legacy.onnx", exporter="legacy"
    )
    assert _ort_max_diff(path, model, torch.randn(5, 3, 12, 12)) <= 1e-4


def test_export_rejects_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="example_input: got str"):
        export_onnx(nn.Linear(4, 2), "x", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="exporter: got 'tvm'"):
        export_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "x.onnx", exporter="tvm")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_reload_matches(tmp_path: Path) -> None:
    model = small_cnn()
    path = export_torchscript(model, torch.randn(4, 3, 12, 12), tmp_path / "student.pt")
    assert model.training is True
    loaded = torch.jit.load(str(path))
    x = torch.randn(6, 3, 12, 12)
    model.eval()
    with torch.no_grad():
        diff = (loaded(x) - model(x)).abs().max().item()
    assert diff <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["student.pt"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_mismatch_leaves_no_file(tmp_path: Path) -> None:
    class ShapeFrozen(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Python int at trace time: the traced graph hard-codes the example's batch size.
            return x * float(x.shape[0])

    with pytest.raises(ExportMismatchError, match="max abs diff"):
        export_torchscript(ShapeFrozen(), torch.ones(2, 3), tmp_path / "frozen.pt")
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_returns_the_checks_result(tmp_path: Path) -> None:
    from kdkit.export import ExportedPath

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    path = export_onnx(model, x, tmp_path / "mlp.onnx")
    assert isinstance(path, ExportedPath) and path == tmp_path / "mlp.onnx"
    assert path.max_abs_diff is not None and 0.0 <= path.max_abs_diff <= 1e-4
    assert path.max_abs_diff >= check_onnx(path, model, x)  # the worst of the checked batches
    unchecked = export_onnx(model, x, tmp_path / "unchecked.onnx", check=False)
    assert unchecked.max_abs_diff is None
