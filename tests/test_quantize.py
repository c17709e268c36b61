"""int8 and fp16 artifacts: valid graphs that stay close to fp32, judged by cosine and top-1, not 1e-5."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from search.core.errors import ExportError, NonFiniteReferenceError, ParityError
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_ops
from exporter.quantize import ApproxParityError, approx_parity, convert_fp16, quantize_int8
from exporter.rewrites import optimize_portable
from exporter.surgery import apply_plan
from exporter.parity import check_parity
from search.budget.allocate import SolverConfig, make_plan
from search.methods.importance import random_scores
from search.budget.macs import describe
from tests.conftest import tiny_vit

INPUT = (3, 32, 32)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    dense = tiny_vit(num_heads=4, embed_dim=64)
    with torch.no_grad():
        for p in dense.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    geometry = describe(dense)
    plan = make_plan(geometry, random_scores(geometry, 0), SolverConfig(0.6, align=4), model="tiny", img_size=32, method="random")
    model = apply_plan(dense, plan)
    return model, export_onnx(model, tmp_path_factory.mktemp("quantize") / "pruned.onnx", INPUT)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(16, *INPUT, generator=torch.Generator().manual_seed(3))


def test_dynamic_int8_quantizes_the_linears(pruned, images, tmp_path: Path) -> None:
    model, src = pruned
    dst = quantize_int8(src, tmp_path / "int8.onnx")
    ops = count_ops(dst)
    linears = 4 * 2  # qkv, proj, fc1, fc2 per block
    assert ops.get("MatMulInteger", 0) == linears, ops
    assert ops.get("DynamicQuantizeLinear", 0) >= 1, ops
    figures = approx_parity(dst, model, images, classifier=True)
    assert figures["passed"] and figures["mean_cosine"] >= 0.99 and figures["top1_agreement"] >= 0.9


def test_static_int8_is_qdq_calibrated_on_images(pruned, images, tmp_path: Path) -> None:
    model, src = pruned
    dst = quantize_int8(src, tmp_path / "int8_static.onnx", mode="static", calibration=images.numpy())
    ops = count_ops(dst)
    assert ops.get("QuantizeLinear", 0) >= 8 and ops.get("DequantizeLinear", 0) >= 8, ops
    figures = approx_parity(dst, src, images, classifier=True)
    assert figures["passed"] and figures["min_cosine"] > 0.9


def test_static_without_calibration_is_refused(pruned, tmp_path: Path) -> None:
    _, src = pruned
    with pytest.raises(ExportError, match="--data"):
        quantize_int8(src, tmp_path / "x.onnx", mode="static")
    assert not (tmp_path / "x.onnx").exists()


def test_fp16_keeps_fp32_io_and_runs_on_cpu(pruned, images, tmp_path: Path) -> None:
    model, src = pruned
    dst = convert_fp16(src, tmp_path / "fp16.onnx")
    graph = onnx.load(str(dst))
    onnx.checker.check_model(graph)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    kinds = Counter(init.data_type for init in graph.graph.initializer if len(init.dims) >= 2)
    assert kinds[onnx.TensorProto.FLOAT16] > 0 and kinds[onnx.TensorProto.FLOAT] == 0, kinds
    # ORT's CPU provider runs this graph (casting where it lacks fp16 kernels): check it honestly.
    figures = approx_parity(dst, model, images, classifier=True)
    assert figures["mean_cosine"] >= 0.999


def test_approx_parity_fails_loudly_when_the_model_is_wrong(pruned, images, tmp_path: Path) -> None:
    model, src = pruned
    other = export_onnx(tiny_vit(num_heads=4, embed_dim=64), tmp_path / "other.onnx", INPUT)
    with pytest.raises(ApproxParityError) as info:
        approx_parity(other, model, images, classifier=True)
    assert isinstance(info.value, ParityError)
    assert info.value.figures["mean_cosine"] < 0.99
    with pytest.raises(ParityError):
        approx_parity(src, model, images[:0], classifier=True)


def test_approx_parity_backbone_has_no_top1(tmp_path: Path) -> None:
    model = tiny_vit(num_classes=0)
    src = export_onnx(model, tmp_path / "backbone.onnx", INPUT)
    figures = approx_parity(src, model, np.random.default_rng(0).standard_normal((4, *INPUT), dtype=np.float32), classifier=False)
    assert figures["top1_agreement"] is None and figures["mean_cosine"] > 0.9999


def test_portable_rewrite_keeps_standard_ops_and_parity(pruned, images, tmp_path: Path) -> None:
    model, src = pruned
    dst = optimize_portable(src, tmp_path / "portable.onnx")
    graph = onnx.load(str(dst))
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert count_ops(dst).get("Gemm", 0) <= 1
    check_parity(dst, model, images, classifier=True)


def test_approx_parity_fails_on_a_non_finite_pytorch_reference(pruned, images) -> None:
    model, src = pruned

    class Poisoned(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x) * float("nan")

    with pytest.raises(NonFiniteReferenceError, match="PyTorch model produced non-finite outputs"):
        approx_parity(src, Poisoned(), images, classifier=True)


class _FlatLogits(torch.nn.Module):
    """An untrained classifier in miniature: 100 logits that differ by ~1e-4 around 5."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3 * 32 * 32, 100)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) * 1e-6)
            self.head.bias.fill_(5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


def test_random_weights_are_judged_by_cosine_only(images, tmp_path: Path) -> None:
    # Two near-flat "models": cosine ~1, yet their top-1 classes are unrelated, as with random weights.
    onnx_path = export_onnx(_FlatLogits(0), tmp_path / "flat.onnx", INPUT)
    reference = _FlatLogits(1).eval()
    with pytest.raises(ApproxParityError, match="top-1 agreement below"):
        approx_parity(onnx_path, reference, images, classifier=True)
    figures = approx_parity(onnx_path, reference, images, classifier=True, judge_top1=False)
    assert figures["passed"] and figures["mean_cosine"] > 0.999
    assert figures["top1_agreement"] < 0.9 and figures["top1_judged"] is False
    assert figures["min_top1_agreement"] is None and "cosine only" in figures["note"]
    with pytest.raises(ApproxParityError, match="mean cosine below"):  # the cosine gate still holds
        approx_parity(onnx_path, reference, images, classifier=True, judge_top1=False, min_mean_cosine=1.01)
