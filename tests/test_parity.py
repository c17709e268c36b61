"""check_parity accepts a faithful export and names what is wrong with a broken one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from timm.models.vision_transformer import VisionTransformer

from search.core.errors import (
    UserError,
    NonFiniteReferenceError,
    OutputNameMismatch,
    OutputShapeMismatch,
    OutputValuesMismatch,
    ParityError,
    ProviderUnavailableError,
)
from exporter.onnx_export import export_onnx
from exporter.parity import available_providers, check_parity, make_session
from tests.conftest import tiny_vit


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[VisionTransformer, Path]:
    model = tiny_vit()
    return model, export_onnx(model, tmp_path_factory.mktemp("parity") / "tiny.onnx", (3, 32, 32))


def _inputs(n: int = 11) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _edited(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dst))
    return dst


def test_parity_passes(exported: tuple[VisionTransformer, Path]) -> None:
    model, path = exported
    result = check_parity(path, model, _inputs(), classifier=True, batch_size=4)
    assert result.passed
    assert result.num_samples == 11
    assert result.max_abs_diff < 1e-4
    assert 0 <= result.mean_abs_diff <= result.max_abs_diff
    assert result.min_cosine > 0.9999
    assert result.top1_agreement == 1.0


def test_backbone_has_no_top1(exported: tuple[VisionTransformer, Path]) -> None:
    model, path = exported
    assert check_parity(path, model, _inputs(3), classifier=False).top1_agreement is None


def test_corrupted_initializer_fails_values(
    exported: tuple[VisionTransformer, Path], tmp_path: Path
) -> None:
    model, path = exported

    def corrupt(graph_model: onnx.ModelProto) -> None:
        largest = max(graph_model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        weights = numpy_helper.to_array(largest).copy()
        weights.flat[: weights.size // 2] += 5.0
        largest.CopyFrom(numpy_helper.from_array(weights, largest.name))

    bad = _edited(path, tmp_path / "bad.onnx", corrupt)
    with pytest.raises(OutputValuesMismatch, match="max \\|diff\\|") as info:
        check_parity(bad, model, _inputs(), classifier=True)
    err = info.value
    assert isinstance(err, ParityError) and isinstance(err, UserError)
    assert err.result is not None and not err.result.passed
    assert err.max_abs_diff == err.result.max_abs_diff > 1e-2
    assert err.tolerance < err.max_abs_diff


def test_wrong_output_name(exported: tuple[VisionTransformer, Path], tmp_path: Path) -> None:
    model, path = exported

    def rename(graph_model: onnx.ModelProto) -> None:
        for node in graph_model.graph.node:
            node.output[:] = ["logits" if o == "output" else o for o in node.output]
        graph_model.graph.output[0].name = "logits"

    bad = _edited(path, tmp_path / "renamed.onnx", rename)
    with pytest.raises(OutputNameMismatch, match="logits") as info:
        check_parity(bad, model, _inputs(2), classifier=True)
    assert info.value.actual == ["logits"] and info.value.expected == ["output"]


def test_wrong_shape(exported: tuple[VisionTransformer, Path], tmp_path: Path) -> None:
    _, path = exported
    other = tiny_vit(num_classes=7)  # the ONNX file gives 10 classes
    with pytest.raises(OutputShapeMismatch) as info:
        check_parity(path, other, _inputs(2), classifier=True)
    assert info.value.expected == (2, 7) and info.value.actual == (2, 10)


def test_restores_training_mode(exported: tuple[VisionTransformer, Path]) -> None:
    model, path = exported
    model.train()
    try:
        assert check_parity(path, model, _inputs(2), classifier=True).passed
        assert model.training
    finally:
        model.eval()


def test_session_settings(exported: tuple[VisionTransformer, Path]) -> None:
    _, path = exported
    assert "CPUExecutionProvider" in available_providers()
    session = make_session(path, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ProviderUnavailableError, match="NoSuchExecutionProvider"):
        make_session(path, threads=1, provider="NoSuchExecutionProvider")


def test_a_provider_that_falls_back_to_the_cpu_is_refused(tmp_path, monkeypatch):
    """ORT quietly runs on the CPU when a listed provider cannot start; the session must not pass as that provider."""
    import onnxruntime as ort

    from search.core.errors import ProviderUnavailableError
    from exporter.runtimes import ort as validate
    from exporter.onnx_export import export_onnx
    from tests.conftest import tiny_vit

    path = export_onnx(tiny_vit(), tmp_path / "m.onnx", (3, 32, 32))
    monkeypatch.setattr(validate, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session = ort.InferenceSession

    def session_without_cuda(path, sess_options=None, providers=None):
        return real_session(path, sess_options=sess_options, providers=[p for p in providers if p == "CPUExecutionProvider"])

    monkeypatch.setattr(validate.ort, "InferenceSession", session_without_cuda)
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider"):
        validate.make_session(path, threads=1, provider="CUDAExecutionProvider")


class _NonFinite(torch.nn.Module):
    """Wraps a model and poisons its output for the chosen samples, as broken weights would."""

    def __init__(self, model: torch.nn.Module, value: float, rows: slice) -> None:
        super().__init__()
        self.model, self.value, self.rows = model, value, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x).clone()
        out[self.rows] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pytorch_reference_fails_parity(exported: tuple[VisionTransformer, Path], value: float) -> None:
    model, path = exported
    with pytest.raises(NonFiniteReferenceError, match="PyTorch model produced non-finite outputs") as info:
        check_parity(path, _NonFinite(model, value, slice(0, 2)), _inputs(4), classifier=True)
    assert isinstance(info.value, ParityError) and isinstance(info.value, UserError)
    assert (info.value.bad, info.value.total) == (2, 4)
