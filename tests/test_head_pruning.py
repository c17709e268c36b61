"""Head pruning end to end: surgery equals masking, blocks without heads export cleanly, the CLI keeps K heads."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs
from exporter.reweight import add_reweights, fold_reweights
from exporter.surgery import apply_plan
from exporter.parity import check_parity
from search.budget.allocate import SolverConfig, head_plan, make_plan
from search.attention import get_kind
from search.attention.base import MeasurableKind
from search.attention.removed import RemovedAttention
from search.families import get_family
from search.families.vit import AttentionlessBlock
from search.methods.gates import head_gated
from search.methods.importance import random_scores
from search.budget.macs import ModelGeometry, describe, model_macs
from search.budget.plan import Plan
from search.cut.blocks import KeptHeads
from tests.conftest import tiny_vit
from tests.test_cli import FAST, assert_clean_failure, invoke
from tests.test_flatten_kind import tiny_flatten
from tests.test_surgery import masked_copy


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("PRUNE_EXPORT_OFFLINE", "1")


def _masks(geometry: ModelGeometry, heads: KeptHeads) -> list[torch.Tensor]:
    masks = [torch.zeros(g.attention.num_heads) for g in geometry.blocks]
    for mask, kept in zip(masks, heads):
        mask[list(kept)] = 1.0
    return masks


def _head_masked(model: torch.nn.Module, heads: KeptHeads, x: torch.Tensor) -> torch.Tensor:
    """The dense model's output with every head outside ``heads`` masked to zero through the attention seam."""
    geometry = describe(model)
    with torch.no_grad(), head_gated(model, geometry, _masks(geometry, heads).__getitem__):
        return model(x)


@torch.no_grad()
def _proj_columns_zeroed(model: torch.nn.Module, heads: KeptHeads) -> torch.nn.Module:
    """The dense model with the proj input columns of every removed head set to zero (no hook involved)."""
    masked = copy.deepcopy(model)
    for block, kept in zip(masked.blocks, heads):
        proj, h = block.attn.proj, block.attn.num_heads
        width = proj.in_features // h
        for head in set(range(h)) - set(kept):
            proj.weight[:, head * width : (head + 1) * width] = 0
    return masked


def _heads_for(model: torch.nn.Module) -> KeptHeads:
    """Block 0 keeps no head, block 1 keeps its last one."""
    return ((), (describe(model).blocks[1].attention.num_heads - 1,))


def test_softmax_head_surgery_equals_the_heads_masked_to_zero(tiny_model):
    heads = _heads_for(tiny_model)
    geometry = describe(tiny_model)
    plan = head_plan(geometry, heads, 1.0, model="tiny", img_size=32, method="dsp")
    pruned = apply_plan(tiny_model, plan)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = pruned(x)
        independent = _proj_columns_zeroed(tiny_model, heads)(x)
    torch.testing.assert_close(got, independent, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, _head_masked(tiny_model, heads, x), atol=1e-5, rtol=0)
    assert isinstance(pruned.blocks[0], AttentionlessBlock) and isinstance(pruned.blocks[0].attn, RemovedAttention)
    assert model_macs(describe(pruned)) == plan.pruned_macs < plan.dense_macs


def test_heads_then_channels_equal_the_removed_rows_zeroed():
    model = tiny_vit(num_heads=4, embed_dim=64, depth=3)
    geometry = describe(model)
    heads = ((0, 2), (), (1, 2, 3))
    plan = make_plan(geometry, random_scores(geometry, 4), SolverConfig(0.55, align=4), model="tiny", img_size=32,
                     method="dsp+acp", heads=heads)
    assert tuple(b.heads for b in plan.blocks) == heads and plan.pruned_macs <= 0.55 * plan.dense_macs
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(apply_plan(model, plan)(x), masked_copy(model, plan)(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pattern, heads", [("LS", ((0, 2), ())), ("LS", ((), (1,))), ("LL", ((1,), (0, 2)))])
def test_flatten_head_surgery_equals_the_heads_masked_to_zero(pattern, heads):
    model = tiny_flatten(pattern)
    geometry = describe(model)
    pruned = apply_plan(model, head_plan(geometry, heads, 1.0, model="t", img_size=32, method="dsp"))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = pruned(x)
    torch.testing.assert_close(got, _head_masked(model, heads, x), atol=1e-5, rtol=0)
    if any(g.kind == "linear" and kept for g, kept in zip(geometry.blocks, heads)):
        # Masking a linear block's head outputs alone is not removal: φ(k)'s norms still see the head.
        family, masks = get_family(geometry.family), _masks(geometry, heads)
        handles = []
        for i, block in enumerate(family.blocks(model)):
            handles += MeasurableKind.head_gate(get_kind(geometry.blocks[i].kind), family.attention(block), lambda i=i: masks[i])
        with torch.no_grad():
            output_only = model(x)
        for h in handles:
            h.remove()
        assert (output_only - got).abs().max() > 1e-3


def test_the_brief_tiny_flatten_model_prunes_heads_too():
    import timm

    import search.models.flatten.deit  # noqa: F401

    model = timm.create_model("flatten_deit_t", pattern="LS", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                              num_classes=10).eval()
    heads = ((2,), (0, 1))
    pruned = apply_plan(model, head_plan(describe(model), heads, 1.0, model="t", img_size=32, method="dsp"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _head_masked(model, heads, x), atol=1e-5, rtol=0)


def _matmuls(path: Path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]


@pytest.mark.parametrize("build", ["softmax", "flatten"])
def test_a_block_without_heads_exports_passes_parity_and_computes_no_attention(tmp_path, build):
    if build == "softmax":
        model = tiny_vit(num_heads=4, embed_dim=64, init_values=0.5, reg_tokens=1)
        heads: KeptHeads = ((), (1, 3))
    else:
        model = tiny_flatten("LS")
        heads = ((), (0, 2))
    geometry = describe(model)
    plan = head_plan(geometry, heads, 1.0, model="t", img_size=32, method="dsp")
    pruned = apply_plan(model, plan)
    dense_path = export_onnx(model, tmp_path / "dense.onnx", (3, 32, 32))
    path = export_onnx(pruned, tmp_path / "pruned.onnx", (3, 32, 32))
    inputs = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert check_parity(path, pruned, inputs, classifier=True).passed
    assert count_onnx_macs(path) == plan.pruned_macs == model_macs(describe(pruned))
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert not [n for n in names if "blocks.0/attn" in n or "blocks.0/norm1" in n]
    assert [n for n in names if "blocks.1/attn" in n]
    # Every product of block 0's attention is gone: qkv, the token mixing, proj (and the DWC for FLatten).
    removed = {"softmax": 4, "flatten": 6}[build]
    assert len(_matmuls(dense_path)) - len(_matmuls(path)) == removed


def test_reweights_skip_a_block_without_heads():
    model = tiny_vit(num_heads=4, embed_dim=64)
    pruned = apply_plan(model, head_plan(describe(model), ((), (0, 1)), 1.0, model="t", img_size=32, method="dsp"))
    add_reweights(pruned)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = pruned(x)
        fold_reweights(pruned)
        torch.testing.assert_close(pruned(x), before)


def test_cli_dsp_keeps_exactly_the_heads_asked_for_and_runs_at_any_batch(tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke("deit_t", "--random-init", "--method", "dsp", "--heads", "24", "--img-size", "64", "--search-steps", "2",
                    "-o", out, "--keep-work", *FAST)
    assert result.exit_code == 0, result.output
    assert "keep 24 of 36 heads" in result.output and "temperature 10 → 0.01" in result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert sum(b["heads"] for b in report["blocks"]) == 24 and all(b["heads"] == 2 for b in report["blocks"])
    assert all(b["qk"] == b["dense"]["qk"] and b["mlp"] == b["dense"]["mlp"] for b in report["blocks"])
    assert report["parity"]["passed"] and report["plan"]["method"] == "dsp" and report["plan"]["budget"] == 1.0
    assert report["macs"]["onnx_ratio"] == pytest.approx(report["macs"]["ratio"], abs=1e-12) and report["macs"]["ratio"] < 1
    assert report["search"]["heads"] == {"kept": 24, "of": 36, "scope": "layer", "source": "--heads"}
    assert "heads kept: 24 of 36" in out.with_suffix(".md").read_text()
    plan = Plan.load(out.with_suffix(".work") / "plan.json")
    assert sum(len(b.heads) for b in plan.blocks) == 24
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        (y,) = session.run(None, {"input": np.random.rand(batch, 3, 64, 64).astype(np.float32)})
        assert y.shape == (batch, 1000)


def test_cli_dsp_plus_acp_meets_the_budget_with_global_heads(tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke("deit_t", "--random-init", "--method", "dsp+acp", "--budget", "0.6", "--heads-scope", "global",
                    "--img-size", "32", "--search-steps", "2", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["macs"]["pruned"] <= 0.6 * report["macs"]["dense"]
    assert report["macs"]["onnx_pruned"] <= 0.6 * report["macs"]["onnx_dense"] and report["parity"]["passed"]
    heads = report["search"]["heads"]
    assert heads["scope"] == "global" and sum(b["heads"] for b in report["blocks"]) == heads["kept"] < 36
    assert "head budget 0.8" in heads["source"]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--heads", "24"], ["--heads", "--method dsp"]),
        (["--method", "acp", "--heads", "24"], ["not --method acp"]),
        (["--method", "dsp", "--heads", "24", "--budget", "0.5"], ["drop --budget 0.5"]),
        (["--method", "magnitude", "--dsp-t0", "5"], ["--dsp-t0", "head pruning"]),
        (["--method", "head-magnitude", "--dsp-lr", "1"], ["--dsp-lr", "--method dsp or dsp+acp"]),
        (["--method", "dsp", "--head-share", "0.3"], ["--head-share", "dsp+acp"]),
        (["--method", "dsp+acp", "--head-share", "1.5"], ["--head-share must be in (0, 1]"]),
        (["--method", "dsp", "--heads-scope", "blocks"], ["--heads-scope", "layer, global"]),
        (["--method", "dsp", "--dsp-t0", "0.001"], ["--dsp-tf", "anneals downwards"]),
        (["--method", "dsp", "--heads", "99"], ["--heads 99", "has 12 heads"]),
        (["--method", "dsp", "--budget", "0.2"], ["removing heads alone", "dsp+acp"]),
    ],
)
def test_contradicting_head_options_fail_in_one_line(tmp_path, args, needles):
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("test_vit", "--random-init", *args, "-o", out, *FAST), out, *needles)


def test_a_plan_fixes_the_heads(tmp_path, test_vit):
    out, plan = tmp_path / "m.onnx", tmp_path / "plan.json"
    plan.write_text(Plan.dense("test_vit", 160, describe(test_vit)).to_json())
    assert_clean_failure(invoke("test_vit", "--random-init", "--plan", plan, "--heads", "4", "-o", out, *FAST), out,
                         "--plan fixes the heads")
