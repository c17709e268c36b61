"""Surgery must equal the dense model with the removed channels zeroed."""
from __future__ import annotations

import copy

import pytest
import torch

from search.attention.softmax import PrunedAttention
from exporter.surgery import apply_plan
from search.budget.allocate import SolverConfig, make_plan
from search.core.errors import PlanError
from search.methods.importance import random_scores
from search.budget.macs import describe, model_macs
from search.budget.plan import Plan
from search.cut.blocks import BlockPlan


@torch.no_grad()
def masked_copy(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """The dense model with every channel the plan removes set to zero (rows and biases)."""
    masked = copy.deepcopy(model)
    for block, bp in zip(masked.blocks, plan.blocks):
        attn = block.attn
        h, d = attn.num_heads, attn.head_dim
        keep = torch.zeros(3, h, d, dtype=torch.bool)
        for pos, head in enumerate(bp.heads):
            keep[0, head, list(bp.qk[pos])] = True
            keep[1, head, list(bp.qk[pos])] = True
            keep[2, head, list(bp.v[pos])] = True
        rows = keep.flatten()
        attn.qkv.weight[~rows] = 0
        if attn.qkv.bias is not None:
            attn.qkv.bias[~rows] = 0
        units = torch.zeros(block.mlp.fc1.out_features, dtype=torch.bool)
        units[list(bp.mlp)] = True
        block.mlp.fc1.weight[~units] = 0
        block.mlp.fc1.bias[~units] = 0
    return masked


def _input(model: torch.nn.Module, batch: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, *model.patch_embed.img_size)


@pytest.mark.parametrize("per_head", [False, True])
def test_surgery_equals_masked_dense(tiny_model, per_head):
    geometry = describe(tiny_model)
    plan = make_plan(
        geometry, random_scores(geometry, seed=3), SolverConfig(0.5, align=4, per_head_indices=per_head),
        model="tiny", img_size=32, method="random",
    )
    assert plan.pruned_macs < model_macs(geometry)
    pruned = apply_plan(tiny_model, plan)
    x = _input(tiny_model)
    with torch.no_grad():
        expected = masked_copy(tiny_model, plan)(x)
        got = pruned(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert all(isinstance(b.attn, PrunedAttention) for b in pruned.blocks)
    assert model_macs(describe(pruned)) == plan.pruned_macs


def test_surgery_with_head_removal_equals_masked_dense():
    from tests.conftest import tiny_vit

    model = tiny_vit(num_heads=4, embed_dim=64)
    geometry = describe(model)
    dense = Plan.dense("tiny", 32, geometry)
    b0 = dense.blocks[0]
    block = BlockPlan(heads=(0, 2, 3), qk=((1, 5, 9, 12),) * 3, v=((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)), mlp=b0.mlp[::2])
    widths = (block.widths,) + dense.widths()[1:]
    plan = Plan("tiny", 32, "manual", 0.9, 1, dense.dense_macs, model_macs(geometry, widths), (block,) + dense.blocks[1:])
    x = _input(model)
    with torch.no_grad():
        torch.testing.assert_close(apply_plan(model, plan)(x), masked_copy(model, plan)(x), atol=1e-5, rtol=0)


def test_pruned_attention_keeps_dense_softmax_scale(test_vit):
    geometry = describe(test_vit)
    plan = make_plan(geometry, random_scores(geometry, 0), SolverConfig(0.5), model="test_vit", img_size=160, method="random")
    pruned = apply_plan(test_vit, plan)
    dense_scale = test_vit.blocks[0].attn.head_dim ** -0.5
    assert all(b.attn.scale == pytest.approx(dense_scale) for b in pruned.blocks)
    assert any(b.attn.qk_dim ** -0.5 != pytest.approx(dense_scale) for b in pruned.blocks)


def test_surgery_rejects_a_plan_for_another_shape(tiny_model, test_vit):
    plan = Plan.dense("test_vit", 160, describe(test_vit))
    with pytest.raises(PlanError):
        apply_plan(tiny_model, plan)


def test_surgery_leaves_the_dense_model_untouched(test_vit):
    before = {k: v.clone() for k, v in test_vit.state_dict().items()}
    geometry = describe(test_vit)
    apply_plan(test_vit, make_plan(geometry, random_scores(geometry, 0), SolverConfig(0.6), model="t", img_size=160, method="random"))
    after = test_vit.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
