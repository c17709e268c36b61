"""FLatten through the attention seam: MACs, gates, removal, reweights, CLI (the kind contract: tests/test_kind_contract.py).

Removal of a q/k channel is defined as deleting it (from q, k, scale and the positional encoding)
before the focusing map, whose norms then run over the remaining channels only; the reference for
surgery is the dense model with those channels gated to zero at the focusing map's input, where
a zero channel adds only (1e-6)² to φ's norms.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import search.models.flatten.deit  # noqa: F401  (registers the FLatten models with timm)
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs
from exporter.reweight import HeadReweight, UnitScale, add_reweights, fold_reweights
from exporter.surgery import apply_plan
from search.methods.acp import AcpConfig, acp_search
from search.methods.activations import capture
from search.budget.allocate import SolverConfig, make_plan
from search.methods.acp_init import attention_differences, init_logits
from search.core.errors import PlanError
from search.models.flatten.attention import FocusedLinearAttention
from search.methods.gates import ChannelGates, gated
from search.methods.importance import BlockScores, magnitude_scores
from search.budget.macs import describe, model_macs
from search.budget.plan import Plan
from search.cut.blocks import BlockPlan
from search.core.runtime import Runtime
from tests.test_cli import FAST, invoke

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10, reg_tokens=1)


def tiny_flatten(pattern: str = "LS", seed: int = 0) -> torch.nn.Module:
    """A 2-block FLatten ViT whose FLatten-only parameters are non-zero, so slicing them matters."""
    torch.manual_seed(seed)
    model = timm.create_model("flatten_deit_t", pattern=pattern, **TINY).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FocusedLinearAttention):
                m.scale.copy_(torch.randn(m.scale.shape, generator=g))
                m.positional_encoding.copy_(0.5 * torch.randn(m.positional_encoding.shape, generator=g))
                m.dwc.bias.copy_(0.1 * torch.randn(m.dwc.bias.shape, generator=g))
    return model


def _plan(model: torch.nn.Module, qk: tuple[int, ...], v: tuple[int, ...]) -> Plan:
    geometry = describe(model)
    blocks = []
    for g in geometry.blocks:
        heads = tuple(range(g.attention.num_heads))
        blocks.append(BlockPlan(heads=heads, qk=(qk,) * len(heads), v=(v,) * len(heads), mlp=tuple(range(0, g.mlp_hidden, 2))))
    widths = tuple(b.widths for b in blocks)
    return Plan(model="t", img_size=32, method="test", budget=1.0, align=1, dense_macs=model_macs(geometry),
                pruned_macs=model_macs(geometry, widths), blocks=tuple(blocks))


def test_the_kind_is_found_per_block_from_the_pattern():
    geometry = describe(tiny_flatten("LS"))
    assert [b.kind for b in geometry.blocks] == ["linear", "softmax"]


@pytest.mark.parametrize("pattern", ["LL", "LS"])
def test_analytic_macs_equal_the_graph_count_dense_and_pruned(tmp_path, pattern):
    model = tiny_flatten(pattern)
    pruned = apply_plan(model, _plan(model, qk=(0, 2, 3, 7, 9, 11), v=(1, 4, 5, 8, 15)))
    for name, m in (("dense", model), ("pruned", pruned)):
        path = export_onnx(m, tmp_path / f"{name}.onnx", (3, 32, 32))
        assert count_onnx_macs(path) == model_macs(describe(m)), name


def test_surgery_equals_the_dense_model_gated_to_zero_at_the_removed_channels():
    model = tiny_flatten("LL")
    qk, v = (0, 2, 3, 7, 9, 11), (1, 4, 5, 8, 15)
    pruned = apply_plan(model, _plan(model, qk, v))
    geometry = describe(model)
    init = []
    for g in geometry.blocks:
        a = g.attention
        qk_logit = torch.full((a.num_heads, a.qk_dim), -60.0)
        qk_logit[:, list(qk)] = 60.0
        v_logit = torch.full((a.num_heads, a.v_dim), -60.0)
        v_logit[:, list(v)] = 60.0
        mlp_logit = torch.full((g.mlp_hidden,), -60.0)
        mlp_logit[::2] = 60.0
        init.append(BlockScores(qk=qk_logit, v=v_logit, mlp=mlp_logit))
    gates = ChannelGates(geometry, init=tuple(init))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), gated(model, gates):
        reference = model(x)
    with torch.no_grad():
        got = pruned(x)
    assert torch.allclose(got, reference, atol=1e-5), (got - reference).abs().max()
    # The focusing map couples the channels: the same cut without re-normalising φ would differ.
    with torch.no_grad():
        assert not torch.allclose(model(x), reference, atol=1e-3)


def test_reweights_fold_into_proj_exactly():
    model = tiny_flatten("LS")
    pruned = apply_plan(model, _plan(model, qk=(0, 1, 2, 3, 4, 5, 6, 7), v=tuple(range(8))))
    add_reweights(pruned)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, (HeadReweight, UnitScale)):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = pruned(x)
        fold_reweights(pruned)
        after = pruned(x)
    assert all(isinstance(b.attn.reweight, torch.nn.Identity) for b in pruned.blocks)
    assert torch.allclose(before, after, atol=1e-5)


def test_per_head_indices_are_refused_for_linear_blocks():
    model = tiny_flatten("LS")
    geometry = describe(model)
    with pytest.raises(PlanError, match="DWC"):
        make_plan(geometry, magnitude_scores(model), SolverConfig(0.7, align=4, per_head_indices=True),
                  model="t", img_size=32, method="magnitude")


def test_acp_search_runs_through_the_linear_kind_and_meets_the_budget():
    model = tiny_flatten("LS")
    geometry = describe(model)
    images = torch.randn(16, 3, 32, 32)
    scores = acp_search(model, geometry, images, AcpConfig(budget=0.6, steps=3, batch_size=8, calib_images=4), True,
                        Runtime(torch.device("cpu"))).scores
    plan = make_plan(geometry, scores, SolverConfig(0.6, align=4, normalise=False), model="t", img_size=32, method="acp")
    assert plan.pruned_macs <= 0.6 * plan.dense_macs
    pruned = apply_plan(model, plan)
    with torch.no_grad():
        assert torch.isfinite(pruned(images[:2])).all()


@pytest.mark.parametrize("method", ["magnitude", "acp"])
def test_cli_prunes_and_exports_a_flatten_model(tmp_path: Path, method: str):
    out = tmp_path / "m.onnx"
    result = invoke("flatten_deit_t", "--random-init", "--pattern", "LLLLLLSSSSSS", "--img-size", "64", "--method", method,
                    "--search-steps", "2", "--budget", "0.7", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["parity"]["passed"] and report["macs"]["onnx_ratio"] == pytest.approx(report["macs"]["ratio"], abs=1e-9)


def test_cli_refuses_a_pattern_for_a_softmax_model(tmp_path: Path):
    out = tmp_path / "m.onnx"
    result = invoke("deit_t", "--random-init", "--pattern", "LS", "-o", out)
    assert result.exit_code == 2 and "--pattern" in result.output and "Traceback" not in result.output


def test_attention_difference_gives_a_dead_linear_channel_the_lowest_init():
    """A q/k channel that computes nothing and a v channel whose output is zero start lowest.

    The linear analogue of the softmax test in test_acp. The q/k channel is dead when its q and k
    rows, their biases and its positional-encoding column are zero: then y = 1e-6 / softplus(s)
    on both sides whatever s is, and φ gives it (1e-6)³ of a norm of order one, nothing. The v
    channel's output is zero when its v row and bias are zero and the shared DWC adds no bias on that
    channel (the DWC's weights only ever see this head's zero v there).
    """
    model = tiny_flatten("LS")
    attn = model.blocks[0].attn
    h, d = attn.num_heads, attn.qk_dim
    qk_head, qk_ch, v_head, v_ch = 1, 5, 2, 7
    with torch.no_grad():
        for row in (qk_head * d + qk_ch, h * d + qk_head * d + qk_ch):
            attn.qkv.weight[row] = 0
            attn.qkv.bias[row] = 0
        attn.positional_encoding[..., qk_head * d + qk_ch] = 0
        v_row = 2 * h * d + v_head * attn.v_dim + v_ch
        attn.qkv.weight[v_row] = 0
        attn.qkv.bias[v_row] = 0
        attn.dwc.bias[v_ch] = 0
        model.blocks[0].mlp.fc1.weight[11] = 0
        model.blocks[0].mlp.fc1.bias[11] = 0
    acts = capture(model, describe(model), torch.randn(4, 3, 32, 32))
    diffs = attention_differences(model, 0, acts[0])
    assert diffs.qk.shape == (h, d) and diffs.v.shape == (h, attn.v_dim)
    assert int(diffs.qk.flatten().argmin()) == qk_head * d + qk_ch
    assert diffs.qk[qk_head, qk_ch] < 1e-6 * diffs.qk.median()
    assert int(diffs.v.flatten().argmin()) == v_head * attn.v_dim + v_ch and diffs.v[v_head, v_ch] == 0
    assert int(diffs.mlp.argmin()) == 11
    logits = init_logits(model, acts)[0]
    assert int(logits.qk.flatten().argmin()) == qk_head * d + qk_ch
    assert int(logits.v.flatten().argmin()) == v_head * attn.v_dim + v_ch
    assert logits.qk.min() < logits.qk.max() and logits.v.min() < logits.v.max()
