"""Every timm ViT family a user may name is pruned, exported and checked, or refused in one line with exit 2.

The compatibility bench (``exporter.bench.compat``) runs each family of the README's table: a
supported one in a tiny form through plan, surgery, export, graph MAC count and parity in ONNX
Runtime at batch 1 and 3; a refused one through the CLI on its real name. The README must hold
exactly the table those outcomes make. The rest pins the parts behind it: the static token count
in the exported graph, recognition by class rather than by name, the post-norm block without
attention, and the refusal of a model timm cannot build at the asked size.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper
from timm.models.vision_transformer import ResPostBlock

from exporter.bench import compat
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs
from exporter.rewrites.expand_sizes import fold_expand_sizes
from exporter.surgery import apply_plan
from search.methods.activations import capture
from search.budget.allocate import head_plan
from search.methods.acp_init import attention_differences
from search.attention import kind_of
from search.core.errors import UnknownModelError
from search.families import prepare
from search.families.beit import BeitAttentionlessBlock
from search.families.vit import AttentionlessBlock
from search.budget.macs import describe, model_macs
from search.models.load import check_architecture, load_model
from tests.conftest import tiny_vit
from tests.test_head_pruning import _head_masked

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("PRUNE_EXPORT_OFFLINE", "1")


@pytest.fixture(scope="module")
def outcomes() -> dict[str, compat.Outcome]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNE_EXPORT_OFFLINE", "1")
        return {o.family.example: o for o in compat.run()}


@pytest.mark.parametrize("family", compat.FAMILIES, ids=lambda f: f.example)
def test_each_family_is_pruned_with_parity_or_refused_in_one_line(family, outcomes):
    outcome = outcomes[family.example]
    assert outcome.status != "failed", outcome.message
    assert outcome.as_expected, f"{family.example} was {outcome.status}, expected supported={family.supported}"
    if outcome.status == "supported":
        figures = outcome.figures
        assert figures["analytic_equals_graph"] and figures["graph_ratio"] <= compat.BUDGET
        assert set(figures["max_abs_diff"]) == {"1", "3"} and max(figures["max_abs_diff"].values()) < 1e-4
    else:
        assert outcome.exit_code == 2
        assert outcome.message.count("\n") == 0 and outcome.message.startswith(f"error: {family.example}: ")
        assert "internal error" not in outcome.message and "Traceback" not in outcome.message
        assert "supports" in outcome.message  # what would be pruned instead


def test_readme_holds_the_table_the_outcomes_make(outcomes):
    table = compat.readme_table([outcomes[f.example] for f in compat.FAMILIES])
    assert compat.readme_block(README) == table, "run: python -m exporter.bench.compat --update-readme README.md"


def test_the_issue_families_count_their_graph_macs_with_a_static_token_count(tmp_path):
    """DeiT-III, registers and FlexiViT concatenate their prefix tokens after the position embedding."""
    for name, tokens in (("deit3_small_patch16_224", 17), ("vit_small_patch14_reg4_dinov2", 21), ("flexivit_small", 17)):
        model = timm.create_model(name, pretrained=False, **compat.TINY).eval()
        path = export_onnx(model, tmp_path / f"{name}.onnx", (3, 32, 32))
        graph = onnx.load(str(path))
        assert not [n for n in graph.graph.node if n.op_type == "Where"]
        assert count_onnx_macs(path) == model_macs(describe(model))
        inferred = onnx.shape_inference.infer_shapes(graph, data_prop=True)  # the batch stays symbolic
        dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
        qkv = next(n.output[0] for n in graph.graph.node if n.op_type == "MatMul")
        assert dims[qkv][1:] == [tokens, 3 * compat.TINY["embed_dim"]], dims[qkv]


def _expand_graph(second: onnx.NodeProto | None) -> onnx.ModelProto:
    """token (1, 1, 4) expanded to (batch, 1, 4) through torch's Where(Equal(size, -1), 1, size)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
    ]
    middle = "minus_one"
    if second is not None:
        nodes.append(second)
        middle = second.output[0]
    nodes += [
        helper.make_node("Concat", ["batch1", middle, "minus_one"], ["size"], axis=0),
        helper.make_node("Equal", ["size", "neg"], ["is_keep"]),
        helper.make_node("Where", ["is_keep", "ones", "size"], ["kept"]),
        helper.make_node("Expand", ["token", "kept"], ["y"]),
        helper.make_node("Identity", ["y"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.zeros(1, np.int64), "axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"), numpy_helper.from_array(-np.ones(3, np.int64), "neg"),
        numpy_helper.from_array(np.ones(3, np.int64), "ones"), numpy_helper.from_array(np.ones((1, 1, 4), np.float32), "token"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    graph.input.append(helper.make_tensor_value_info("n", TensorProto.INT64, [1]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, batch: int) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.zeros((batch, 4), np.float32), "n": np.array([-1], np.int64)})[0]


def test_expand_sizes_are_folded_only_where_the_where_is_exact():
    model = _expand_graph(None)
    before = _run(model, 3)
    assert fold_expand_sizes(model) == 1
    np.testing.assert_array_equal(_run(model, 3), before)
    assert _run(model, 1).shape == (1, 1, 4) and before.shape == (3, 1, 4)
    assert [n.op_type for n in model.graph.node] == ["Shape", "Gather", "Unsqueeze", "Concat", "Expand", "Identity"]
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    expanded = next(v for v in inferred.graph.value_info if v.name == "y")
    assert [d.dim_value or d.dim_param for d in expanded.type.tensor_type.shape.dim] == ["batch", 1, 4]
    # A part that is not read from a Shape could be -1 at run time: the Where stays.
    unknown = _expand_graph(helper.make_node("Identity", ["n"], ["from_input"]))
    assert fold_expand_sizes(unknown) == 0
    assert "Where" in [n.op_type for n in unknown.graph.node]


def _tiny_beit(**overrides) -> torch.nn.Module:
    """A tiny BEiT with every weight drawn at one scale, so its score biases, q/v biases and gammas all count."""
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, **{**compat.TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_an_attention_called_attention_is_recognised_by_class_not_by_name():
    beit = _tiny_beit()
    with pytest.raises(UnknownModelError, match=r"attention module Attention is not a kind .*timm's Attention"):
        kind_of(beit.blocks[0].attn)  # BEiT's own attention, before its family puts it in the softmax form
    assert [kind_of(b.attn).name for b in prepare(beit).blocks] == ["softmax", "softmax"]


@pytest.mark.parametrize("overrides", [{}, {"use_shared_rel_pos_bias": True}], ids=["own-bias", "shared-bias-too"])
def test_beit_in_the_softmax_form_computes_what_beit_computes(overrides):
    raw = _tiny_beit(**overrides)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = raw.forward_features(x)
        prepared = prepare(copy.deepcopy(raw))
        torch.testing.assert_close(prepared.forward_features(x), expected, atol=1e-5, rtol=1e-5)
    assert prepared.rel_pos_bias is None and prepared.blocks[0].attn.attn_bias.shape == (4, 17, 17)


def test_beit_head_surgery_keeps_the_kept_heads_biases_and_equals_the_heads_masked():
    model = prepare(_tiny_beit())
    geometry = describe(model)
    heads = ((), (0, 3))
    pruned = apply_plan(model, head_plan(geometry, heads, 1.0, model="t", img_size=32, method="dsp"))
    assert isinstance(pruned.blocks[0], BeitAttentionlessBlock)
    torch.testing.assert_close(pruned.blocks[1].attn.attn_bias, model.blocks[1].attn.attn_bias[[0, 3]])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pruned(x)
    torch.testing.assert_close(got, _head_masked(model, heads, x), atol=1e-5, rtol=1e-5)


def test_a_post_norm_block_without_heads_equals_its_heads_masked():
    model = tiny_vit(block_fn=ResPostBlock, num_heads=4, embed_dim=64, class_token=False, global_pool="avg")
    geometry = describe(model)
    heads = ((), (1, 3))
    pruned = apply_plan(model, head_plan(geometry, heads, 1.0, model="t", img_size=32, method="dsp"))
    assert isinstance(pruned.blocks[0], AttentionlessBlock) and pruned.blocks[0].post_norm
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = pruned(x)
    torch.testing.assert_close(got, _head_masked(model, heads, x), atol=1e-5, rtol=0)


def test_a_size_timm_cannot_build_and_an_unknown_family_are_refused_before_any_weights():
    with pytest.raises(UnknownModelError, match=r"timm cannot build resnet18 at --img-size 64"):
        check_architecture("resnet18", img_size=64)
    with pytest.raises(UnknownModelError, match=r"^resnet18: ResNet is not a model family"):
        load_model("resnet18", random_init=True)


def test_beit_attention_difference_keeps_the_score_bias():
    model = prepare(_tiny_beit(depth=1))
    geometry = describe(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    diffs = attention_differences(model, 0, capture(model, geometry, x)[0])
    block = model.blocks[0]
    with torch.no_grad():
        tokens = block.norm1(torch.cat((model.cls_token.expand(2, -1, -1), model.patch_embed(x)), dim=1))
        base = block.attn(tokens)
        qkv = block.attn.qkv
        for row in (5, 16 + 3):  # q/k channel 5 of head 0, channel 3 of head 1
            saved = qkv.weight[row].clone(), qkv.bias[row].clone()
            qkv.weight[row], qkv.bias[row] = 0, 0
            removed = block.attn(tokens)
            qkv.weight[row], qkv.bias[row] = saved
            assert diffs.qk[row // 16, row % 16].item() == pytest.approx((removed - base).pow(2).sum().item(), rel=1e-3)
