"""The budget solver: never over the budget, always aligned, and an unreachable budget is an error."""
from __future__ import annotations

import pytest
import torch

from search.budget.allocate import SolverConfig, make_plan, min_widths, solve_widths
from search.core.errors import BudgetError
from search.methods.importance import BlockScores, magnitude_scores, random_scores
from search.budget.macs import describe, model_macs


@pytest.mark.parametrize("budget", [0.3, 0.45, 0.5, 0.63, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("align", [4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_never_over_budget_and_always_aligned(test_vit, budget, align, seed):
    geometry = describe(test_vit)
    widths = solve_widths(geometry, random_scores(geometry, seed), SolverConfig(budget, align=align))
    assert model_macs(geometry, widths) <= budget * model_macs(geometry)
    for w, dense in zip(widths, geometry.dense_widths()):
        for group in ("qk", "v", "mlp"):
            kept, full = getattr(w, group), getattr(dense, group)
            assert kept == full or (kept % align == 0 and kept >= align)


def test_budget_one_keeps_the_dense_model(test_vit):
    geometry = describe(test_vit)
    assert solve_widths(geometry, magnitude_scores(test_vit), SolverConfig(1.0)) == geometry.dense_widths()


def test_solver_lands_close_to_the_budget(test_vit):
    geometry = describe(test_vit)
    widths = solve_widths(geometry, random_scores(geometry, 0), SolverConfig(0.63, align=8))
    ratio = model_macs(geometry, widths) / model_macs(geometry)
    assert 0.60 < ratio <= 0.63


def test_unreachable_budget_names_the_floor(test_vit):
    geometry = describe(test_vit)
    floor = model_macs(geometry, min_widths(geometry, 8)) / model_macs(geometry)
    with pytest.raises(BudgetError, match=f"{floor:.3f}"):
        solve_widths(geometry, random_scores(geometry, 0), SolverConfig(floor * 0.9))


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01])
def test_budget_outside_unit_interval_is_rejected(budget):
    with pytest.raises(BudgetError):
        SolverConfig(budget)


def test_low_scores_are_removed_first(test_vit):
    geometry = describe(test_vit)
    scores = list(random_scores(geometry, 0))
    mlp = torch.ones_like(scores[0].mlp)
    mlp[:64] = 100.0
    scores[0] = BlockScores(qk=scores[0].qk, v=scores[0].v, mlp=mlp)
    plan = make_plan(geometry, tuple(scores), SolverConfig(0.5), model="test_vit", img_size=160, method="t")
    assert set(range(64)) <= set(plan.blocks[0].mlp)


def test_shared_indices_are_the_same_in_every_head(test_vit):
    geometry = describe(test_vit)
    plan = make_plan(geometry, random_scores(geometry, 0), SolverConfig(0.5), model="test_vit", img_size=160, method="t")
    assert all(b.shared_indices for b in plan.blocks)
    per_head = make_plan(geometry, random_scores(geometry, 0), SolverConfig(0.5, per_head_indices=True), model="test_vit", img_size=160, method="t")
    assert not all(b.shared_indices for b in per_head.blocks)
