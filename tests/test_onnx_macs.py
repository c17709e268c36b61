"""count_onnx_macs recounts a ViT's MACs from its exported graph, matching the formula exactly."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from timm.models.vision_transformer import VisionTransformer

from search.core.errors import MacCountError
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs, count_ops
from tests.conftest import tiny_vit


def vit_macs(model: VisionTransformer) -> int:
    """MACs at batch 1, by hand from the model's dims (class-token pooling head)."""
    dim = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    patches = model.patch_embed.num_patches
    tokens = patches + model.num_prefix_tokens
    patch_h, patch_w = model.patch_embed.patch_size
    in_chans = model.patch_embed.proj.in_channels
    patch_conv = patches * dim * in_chans * patch_h * patch_w
    per_block = (
        tokens * dim * 3 * dim  # qkv
        + tokens * tokens * dim  # q @ k^T, summed over heads: H * N * N * (D / H)
        + tokens * tokens * dim  # attn @ v
        + tokens * dim * dim  # proj
        + tokens * dim * hidden  # fc1
        + tokens * hidden * dim  # fc2
    )
    head = dim * model.num_classes
    return patch_conv + len(model.blocks) * per_block + head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[VisionTransformer, Path]:
    model = tiny_vit()
    path = export_onnx(model, tmp_path_factory.mktemp("macs") / "tiny.onnx", (3, 32, 32))
    return model, path


def test_tiny_vit_macs_match_formula(tiny: tuple[VisionTransformer, Path]) -> None:
    model, path = tiny
    assert count_onnx_macs(path) == vit_macs(model)


def test_macs_scale_with_batch(tiny: tuple[VisionTransformer, Path]) -> None:
    _, path = tiny
    assert count_onnx_macs(path, batch=2) == 2 * count_onnx_macs(path, batch=1)
    assert count_onnx_macs(path, batch=5) == 5 * count_onnx_macs(path, batch=1)


def test_test_vit_macs_match_formula(tmp_path: Path, test_vit: VisionTransformer) -> None:
    path = export_onnx(test_vit, tmp_path / "test_vit.onnx", (3, 160, 160))
    assert count_onnx_macs(path) == vit_macs(test_vit)


def test_count_ops(tiny: tuple[VisionTransformer, Path]) -> None:
    _, path = tiny
    ops = count_ops(path)
    assert ops["Conv"] == 1
    assert ops["Softmax"] == 2
    assert ops["LayerNormalization"] == 5  # two per block and the final norm
    linear = 4 * 2 + 1  # qkv, proj, fc1, fc2 per block, and the head
    attention = 2 * 2  # q @ k^T and attn @ v per block
    assert ops.get("MatMul", 0) + ops.get("Gemm", 0) == linear + attention
    assert list(ops.values()) == sorted(ops.values(), reverse=True)


def test_unknown_shape_raises(tmp_path: Path) -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "k"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["k", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [a, b], [y])
    path = tmp_path / "unknown.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(MacCountError, match="mm") as info:
        count_onnx_macs(path)
    assert info.value.op_type == "MatMul"


def _save(tmp_path: Path, node: onnx.NodeProto, inputs: list, inits: list) -> Path:
    y = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", inputs, [y], initializer=inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_gemm_with_transposed_a(tmp_path: Path) -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [7, 3])  # (K, M) with transA
    weight = helper.make_tensor("w", TensorProto.FLOAT, [7, 5], [0.0] * 35)
    path = _save(tmp_path, helper.make_node("Gemm", ["a", "w"], ["y"], transA=1), [a], [weight])
    assert count_onnx_macs(path) == 3 * 5 * 7


def test_grouped_conv(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])
    weight = helper.make_tensor("w", TensorProto.FLOAT, [6, 2, 3, 3], [0.0] * 108)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=2, pads=[1, 1, 1, 1])
    path = _save(tmp_path, node, [x], [weight])
    assert count_onnx_macs(path, batch=3) == 3 * (6 * 8 * 8) * (4 // 2) * 3 * 3
