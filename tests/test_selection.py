"""Choosing what a compensated cut keeps: the greedy OBS selection, and the plan compensation hands back."""
from __future__ import annotations

import itertools

import pytest
import torch

from exporter.compensation import CompensationConfig, compensate, rechosen
from exporter.surgery import apply_plan
from search.attention import get_kind
from search.budget.macs import describe
from search.core.runtime import runtime
from search.cut.blocks import BlockPlan
from search.cut.least_squares import NormalEquations, ridge_solve
from search.cut.selection import keep_least_loss
from tests.conftest import tiny_vit
from tests.test_compensation import _cut


def _refit_loss(x: torch.Tensor, y: torch.Tensor, keep: list[int]) -> float:
    """Squared error of the least-squares fit of y from the columns ``keep`` of x."""
    z = x[:, keep]
    solution = torch.linalg.lstsq(z, y).solution
    return float((z @ solution - y).pow(2).sum())


def test_a_unit_the_others_can_say_is_removed_at_no_loss_where_importance_removes_an_independent_one():
    torch.manual_seed(0)
    x = torch.randn(4000, 5, dtype=torch.float64)
    x[:, 2] *= 0.5  # the least important unit by weight × activation, and independent of the rest
    x = torch.cat([x, x[:, :2] @ torch.tensor([[2.0], [-1.0]], dtype=torch.float64)], dim=1)  # unit 5 = 2·x0 − x1
    w = torch.ones(3, 6, dtype=torch.float64)
    w[:, 5] = 10.0  # the largest weight: by importance alone it would be kept first
    y = x @ w.T
    gram = x.T @ x
    chosen = keep_least_loss(gram, w, 5, damp=1e-9)
    assert set(range(6)) - set(chosen) <= {0, 1, 5}  # x0, x1 and x5 are linearly dependent: one of them is free to go
    assert _refit_loss(x, y, chosen) < 1e-6
    by_importance = sorted(range(6), key=lambda j: -float(w[:, j].norm() * x[:, j].norm()))[:5]
    assert 2 not in by_importance and _refit_loss(x, y, sorted(by_importance)) > 1.0


def test_the_greedy_choice_is_the_best_subset_on_a_small_problem_and_groups_go_whole():
    torch.manual_seed(1)
    mix = torch.randn(7, 7, dtype=torch.float64) * 0.6 + torch.eye(7, dtype=torch.float64)
    x = torch.randn(3000, 7, dtype=torch.float64) @ mix
    w = torch.randn(4, 7, dtype=torch.float64)
    y = x @ w.T
    chosen = keep_least_loss(x.T @ x, w, 4, damp=1e-9, steps=10**6)
    losses = {c: _refit_loss(x, y, list(c)) for c in itertools.combinations(range(7), 4)}
    ranked = sorted(losses.values())
    assert losses[tuple(chosen)] <= ranked[min(2, len(ranked) - 1)] + 1e-9  # greedy: among the very best subsets
    groups = [[0, 1], [2, 3], [4, 5], [6]]
    kept = keep_least_loss(x.T @ x, w, 2, groups=groups, damp=1e-9)
    assert len(kept) == 2 and all(0 <= g < 4 for g in kept)
    with pytest.raises(ValueError, match="keep must be"):
        keep_least_loss(x.T @ x, w, 0)


@torch.no_grad()
def test_choose_qk_keeps_the_channels_that_say_the_removed_keys():
    from timm.layers import Attention

    torch.manual_seed(2)
    h, d, dim = 2, 8, 16
    attn = Attention(dim, num_heads=h, qkv_bias=True).eval()
    w = attn.qkv.weight
    for head in range(h):  # in every head, key channel 7 is 1.5·channel 3: one of the two can go at no cost
        k = h * d + head * d
        w[k + 7] = 1.5 * w[k + 3]
        attn.qkv.bias[k + 7] = 1.5 * attn.qkv.bias[k + 3]
    plan = BlockPlan(heads=(0, 1), qk=((0, 1, 2, 4, 5, 6, 7),) * 2, v=(tuple(range(d)),) * 2, mlp=())
    x = torch.randn(64, 10, dim)
    chosen = get_kind("softmax").choose_qk(attn, plan, x, x, ridge=1e-6)
    assert chosen is not None and len(chosen) == 2 and chosen[0] == chosen[1] and len(chosen[0]) == 7
    assert 3 not in chosen[0] or 7 not in chosen[0]


@pytest.mark.parametrize("variant", [dict(), dict(init_values=0.5, reg_tokens=2, num_classes=0)])
def test_the_compensated_plan_keeps_the_counts_and_cuts_the_model_it_describes(variant):
    dense = tiny_vit(**variant)
    plan, pruned = _cut(dense)
    torch.manual_seed(4)
    images = torch.randn(48, 3, 32, 32)
    with runtime("cpu") as rt:
        result = compensate(dense, pruned, plan, images, CompensationConfig(batch=16), rt)
    final = result.plan
    assert final is not None and final.widths() == plan.widths() and final.pruned_macs == plan.pruned_macs
    final.check(describe(dense))
    assert all(b.shared_indices for b in final.blocks)
    assert result.rechosen == rechosen(plan, final) > 0  # something was re-chosen on random weights
    assert {"units", "channels"} <= set(result.blocks[0].fitted) or result.blocks[0].reverted
    recut = apply_plan(dense, final)  # the plan names the dense rows and columns that the compensated model keeps, ...
    fc1, fc1_recut = pruned.blocks[0].mlp.fc1, recut.blocks[0].mlp.fc1
    if not result.blocks[0].reverted and "fc1" not in result.blocks[0].fitted:
        assert torch.equal(fc1.weight, fc1_recut.weight)
    assert [p.shape for p in recut.parameters()] == [p.shape for p in pruned.parameters()]  # ... with the same shapes


def test_rearrangement_can_be_turned_off_and_then_the_plan_is_the_searched_one():
    dense = tiny_vit()
    plan, pruned = _cut(dense)
    with runtime("cpu") as rt:
        result = compensate(dense, pruned, plan, torch.randn(32, 3, 32, 32), CompensationConfig(rearrange=False), rt)
    assert result.plan == plan and result.rechosen == 0


def test_a_flatten_model_is_compensated_with_its_v_channels_rechosen_and_no_logit_fit():
    from tests.test_flatten_kind import _plan, tiny_flatten

    dense = tiny_flatten("LS")
    plan = _plan(dense, qk=(0, 2, 4, 6, 8, 10, 12, 14), v=(1, 3, 5, 7, 9, 11, 13, 15))
    pruned = apply_plan(dense, plan)
    torch.manual_seed(5)
    images = torch.randn(32, 3, 32, 32)
    with runtime("cpu") as rt:
        result = compensate(dense, pruned, plan, images, CompensationConfig(batch=16), rt)
    assert result.plan.widths() == plan.widths()
    linear, softmax = result.blocks
    assert "logits" not in linear.fitted and "logits" in softmax.fitted or softmax.reverted
    assert any("no logit fit" in note for note in result.notes)
    assert all(b.after <= b.before for b in result.blocks)
    recut = apply_plan(dense, result.plan)
    assert [p.shape for p in recut.parameters()] == [p.shape for p in pruned.parameters()]
