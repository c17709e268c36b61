"""Surgery: turn a dense model and a Plan into a physically smaller model.

The result is the same model class whose attention modules are replaced by their kind's sliced
module and whose MLPs have fewer hidden units; the model family says where both are. A block whose
plan keeps no head loses its attention branch (the family rebuilds it as residual + MLP), so the
exported graph computes nothing for it. The input model is left untouched.
"""
from __future__ import annotations

import copy

from torch import nn

from search.attention import get_kind
from search.families import family_of
from search.budget.macs import ModelGeometry, describe
from search.budget.plan import Plan


def apply_plan(model: nn.Module, plan: Plan, geometry: ModelGeometry | None = None) -> nn.Module:
    """A pruned copy of ``model`` that keeps exactly what ``plan`` keeps.

    ``geometry`` is ``model``'s, when the caller has it already (read from the model otherwise).
    Raises PlanError when the plan does not fit the model.
    """
    geometry = describe(model) if geometry is None else geometry
    plan.check(geometry)
    pruned = copy.deepcopy(model)
    family = family_of(pruned)
    for i, (block_plan, block_geometry) in enumerate(zip(plan.blocks, geometry.blocks)):
        block = family.blocks(pruned)[i]
        if block_plan.heads:
            family.set_attention(block, get_kind(block_geometry.kind).slice(family.attention(block), block_plan))
        else:
            block = family.drop_attention(pruned, i)
        family.slice_mlp(block, block_plan.mlp)
    return pruned
