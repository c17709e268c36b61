"""export_onnx writes a checked, simplified graph whose batch axis stays dynamic, or nothing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from search.core.errors import ExportError
from exporter.onnx_export import export_onnx
from tests.conftest import tiny_vit


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x.numpy()})[0]


def test_export_test_vit_runs_at_two_batch_sizes(tmp_path: Path, test_vit: nn.Module) -> None:
    path = export_onnx(test_vit, tmp_path / "vit.onnx", (3, 160, 160))
    assert path == tmp_path / "vit.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.opset_import[0].version == 17
    for batch in (1, 3):
        x = torch.randn(batch, 3, 160, 160)
        got = _run(path, x)
        with torch.no_grad():
            want = test_vit(x).numpy()
        assert got.shape == (batch, 1000)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.onnx"]


def test_export_restores_training_mode(tmp_path: Path) -> None:
    model = tiny_vit().train()
    export_onnx(model, tmp_path / "m.onnx", (3, 32, 32))
    assert model.training


def test_export_creates_parent_directories(tmp_path: Path) -> None:
    path = export_onnx(tiny_vit(), tmp_path / "a" / "b" / "m.onnx", (3, 32, 32))
    assert path.is_file()


class _Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("forward exploded")


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="forward exploded") as info:
        export_onnx(_Exploding(), tmp_path / "bad.onnx", (3, 32, 32))
    assert info.value.stage == "torch.onnx.export"
    assert isinstance(info.value.cause, RuntimeError)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError):
        export_onnx(_Exploding(), path, (3, 32, 32))
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_opset_below_17_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opset 13"):
        export_onnx(tiny_vit(), tmp_path / "m.onnx", (3, 32, 32), opset=13)
    assert list(tmp_path.iterdir()) == []


def test_export_of_fp64_model_leaves_caller_model_alone(tmp_path: Path) -> None:
    model = tiny_vit().double()
    path = export_onnx(model, tmp_path / "m.onnx", (3, 32, 32))
    assert next(model.parameters()).dtype == torch.float64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x.double()).float().numpy()
    np.testing.assert_allclose(_run(path, x), want, atol=1e-4, rtol=1e-3)
