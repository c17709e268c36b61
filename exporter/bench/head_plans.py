"""Plans with the shapes head pruning produces, for the latency bench.

Latency depends on a plan's shape (kept heads and widths), not on how the heads were chosen. On
random weights a DSP search would learn nothing worth its minutes, so the bench builds the two
shapes head pruning gives at a budget with the magnitude baseline, the same way the methods do:

- the shape of ``--method dsp`` (and ``head-magnitude``): K from the budget, whole heads;
- the shape of ``--method dsp+acp``: K from the budget's head share, then channels of the kept
  heads cut to the budget;
- half of the heads kept (``--heads N/2``), the comparison of DSP with the magnitude baseline.
"""
from __future__ import annotations

from torch import nn

from search.budget.allocate import SolverConfig, head_plan, make_plan
from search.core.errors import BudgetError
from search.methods.heads import HeadTarget, head_magnitude_scores, heads_for_budget, top_heads, total_heads
from search.methods.importance import magnitude_scores
from search.budget.macs import ModelGeometry
from search.methods.registry import head_budget
from search.budget.plan import Plan


def head_pruned_plans(model: nn.Module, geometry: ModelGeometry, budget: float, *, name: str, img_size: int,
                      align: int = 8) -> dict[str, Plan]:
    """Head-pruned plans of ``model``, heads chosen by magnitude, keyed by the name of their bench row.

    - ``heads@<budget>``: the dsp shape at ``budget``, when removing whole heads can reach it (in a
      ViT whose MLP holds two thirds of the MACs, no head-only model goes below about 0.64);
    - ``heads+channels@<budget>``: the dsp+acp shape at ``budget``;
    - ``half-heads``: half of the heads kept whole (``--heads N/2``), the MACs following from them.
    """
    scores = head_magnitude_scores(model)
    tag = f"{budget:g}"
    plans: dict[str, Plan] = {}
    try:
        only = top_heads(scores, HeadTarget(heads_for_budget(geometry, head_budget("dsp", budget), "layer")), geometry)
        plans[f"heads@{tag}"] = head_plan(geometry, only, budget, model=name, img_size=img_size, method="head-magnitude")
    except BudgetError:
        pass
    mixed = top_heads(scores, HeadTarget(heads_for_budget(geometry, head_budget("dsp+acp", budget), "layer")), geometry)
    plans[f"heads+channels@{tag}"] = make_plan(geometry, magnitude_scores(model), SolverConfig(budget, align=align), model=name,
                                               img_size=img_size, method="head-magnitude+magnitude", heads=mixed)
    half = top_heads(scores, HeadTarget(total_heads(geometry) // 2), geometry)
    plans["half-heads"] = head_plan(geometry, half, 1.0, model=name, img_size=img_size, method="head-magnitude")
    return plans
