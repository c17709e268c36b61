"""The --target ort artifact: our graph rewrites keep the numbers, and the fused ops are really there."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from search.core.errors import ExportError
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_ops
from exporter.ort_target import FUSED, OrtTargetConfig, optimize_for_ort, optimizer_widths
from exporter.rewrites.fuse_attention import fuse_attention
from exporter.rewrites.unflatten_gemm import unflatten_gemm
from exporter.surgery import apply_plan
from exporter.parity import check_parity
from search.budget.allocate import SolverConfig, head_plan, make_plan
from search.families import get_family
from search.methods.importance import random_scores
from search.budget.macs import describe
from tests.conftest import TINY_VARIANTS, tiny_vit

INPUT = (3, 32, 32)


def _nonzero_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Random-init timm models have zero biases, which onnxsim deletes; real ones do not."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _pruned(model: torch.nn.Module, budget: float = 0.7) -> torch.nn.Module:
    geometry = describe(model)
    plan = make_plan(geometry, random_scores(geometry, 0), SolverConfig(budget, align=4), model="tiny", img_size=32, method="random")
    return apply_plan(model, plan)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """A dense tiny ViT (timm's attention layout) and a pruned one (PrunedAttention, qk != v)."""
    folder = tmp_path_factory.mktemp("ort_target")
    dense = _nonzero_biases(tiny_vit(num_heads=4, embed_dim=64))
    pruned = _pruned(dense)
    assert any(b.attn.qk_dim != b.attn.v_dim for b in pruned.blocks), "want a block with qk != v widths"
    return {
        "dense": (dense, export_onnx(dense, folder / "dense.onnx", INPUT)),
        "pruned": (pruned, export_onnx(pruned, folder / "pruned.onnx", INPUT)),
    }


@pytest.mark.parametrize("which", ["dense", "pruned"])
@pytest.mark.parametrize("config", [OrtTargetConfig(), FUSED], ids=["default", "fused"])
def test_ort_target_passes_parity(exported, which: str, config: OrtTargetConfig, tmp_path: Path) -> None:
    model, src = exported[which]
    dst = optimize_for_ort(src, tmp_path / "ort.onnx", num_heads=4, hidden_size=64, threads=1, config=config)
    result = check_parity(dst, model, torch.randn(6, *INPUT), classifier=True)
    assert result.passed and result.top1_agreement == 1.0


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_fused_ort_graph_has_fused_ops(exported, which: str, tmp_path: Path) -> None:
    _, src = exported[which]
    dst = optimize_for_ort(src, tmp_path / "ort.onnx", num_heads=4, hidden_size=64, threads=1, config=FUSED)
    ops = count_ops(dst)
    depth = 2
    assert ops.get("Attention", 0) == depth, ops
    assert ops.get("SkipLayerNormalization", 0) >= depth, ops
    assert ops.get("BiasGelu", 0) + ops.get("FastGelu", 0) == depth, ops
    assert "Softmax" not in ops and "Split" not in ops, ops
    domains = {node.domain for node in onnx.load(str(dst)).graph.node}
    assert "com.microsoft" in domains


def test_default_ort_graph_uses_ort_fusions(exported, tmp_path: Path) -> None:
    _, src = exported["pruned"]
    dst = optimize_for_ort(src, tmp_path / "ort.onnx", num_heads=4, hidden_size=64, threads=1)
    ops = count_ops(dst)
    assert ops.get("BiasGelu", 0) == 2, ops
    assert ops.get("Gemm", 0) <= 1, ops  # every token-wise linear is a 3-D MatMul again; the head may stay Gemm
    assert ops.get("Reshape", 0) < count_ops(src)["Reshape"], ops


def test_attention_fusion_keeps_qkv_widths_and_scale(exported) -> None:
    model, src = exported["pruned"]
    graph = onnx.load(str(src))
    assert fuse_attention(graph) == 2
    attentions = [n for n in graph.graph.node if n.op_type == "Attention"]
    for node, block in zip(attentions, model.blocks):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        a = block.attn
        assert attrs["num_heads"] == a.num_heads
        assert list(attrs["qkv_hidden_sizes"]) == [a.num_heads * a.qk_dim] * 2 + [a.num_heads * a.v_dim]
        assert attrs["scale"] == pytest.approx(a.scale, rel=1e-6)


def test_rewrites_leave_unmatched_graphs_alone() -> None:
    graph = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        )
    )
    assert fuse_attention(graph) == 0
    assert unflatten_gemm(graph) == 0
    assert [n.op_type for n in graph.graph.node] == ["Relu"]


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_unflatten_gemm_is_exact_on_every_tiny_variant(variant: str, tmp_path: Path) -> None:
    model = _nonzero_biases(tiny_vit(**TINY_VARIANTS[variant]))
    src = export_onnx(model, tmp_path / "m.onnx", INPUT)
    graph = onnx.load(str(src))
    assert unflatten_gemm(graph) > 0
    fuse_attention(graph)
    onnx.checker.check_model(graph)
    onnx.save(graph, tmp_path / "rewritten.onnx")
    check_parity(tmp_path / "rewritten.onnx", model, torch.randn(4, *INPUT), classifier=model.num_classes > 0)


def test_missing_source_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises((ExportError, FileNotFoundError, OSError)):
        optimize_for_ort(tmp_path / "nope.onnx", tmp_path / "out.onnx", num_heads=2, hidden_size=32)
    assert not (tmp_path / "out.onnx").exists()


def test_outputs_are_numpy_close_across_targets(exported, tmp_path: Path) -> None:
    """The default and the fused artifacts agree with each other as well as with PyTorch."""
    import onnxruntime as ort

    _, src = exported["pruned"]
    x = np.random.default_rng(0).standard_normal((3, *INPUT), dtype=np.float32)
    outs = []
    for name, config in (("default", OrtTargetConfig()), ("fused", FUSED)):
        path = optimize_for_ort(src, tmp_path / f"{name}.onnx", num_heads=4, hidden_size=64, config=config)
        outs.append(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4, rtol=1e-3)


def test_transformers_optimizer_gets_one_head_count_only_when_every_block_shares_it():
    assert optimizer_widths(4, 64) == (4, 64)
    assert optimizer_widths((4, 4, 4), 64) == (4, 64)
    assert optimizer_widths((3, 4), 64) == (0, 0)  # head pruning: blocks differ
    assert optimizer_widths((3, 3), 64) == (0, 0)  # 3 does not divide 64: the optimizer would assert
    assert optimizer_widths((0, 4), 64) == (0, 0)


def test_every_fusion_passes_parity_on_blocks_with_different_head_counts(tmp_path: Path) -> None:
    """Head pruning leaves 3 heads in one block and 1 in the other: no one count fits the model."""
    model = _nonzero_biases(tiny_vit(num_heads=4, embed_dim=64))
    plan = head_plan(describe(model), ((0, 1, 3), (2,)), 1.0, model="tiny", img_size=32, method="dsp")
    pruned = apply_plan(model, plan)
    heads = get_family("vit").head_counts(pruned)
    assert heads == (3, 1)
    src = export_onnx(pruned, tmp_path / "pruned.onnx", INPUT)
    dst = optimize_for_ort(src, tmp_path / "ort.onnx", num_heads=heads, hidden_size=64, threads=1, config=FUSED)
    assert count_ops(dst).get("Attention", 0) == 2
    result = check_parity(dst, pruned, torch.randn(6, *INPUT), classifier=True)
    assert result.passed and result.top1_agreement == 1.0
