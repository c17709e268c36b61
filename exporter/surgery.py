"""Surgery: turn a dense model and a Plan into a physically smaller model.

The result is the same model class whose attention modules are replaced by their kind's sliced
module and whose MLPs have fewer hidden units; the model family says where both are. The input
model is left untouched.
"""
from __future__ import annotations

import copy

from torch import nn

from search.attention import get_kind
from search.families import family_of
from search.macs import ModelGeometry, describe
from search.plan import Plan


def apply_plan(model: nn.Module, plan: Plan, geometry: ModelGeometry | None = None) -> nn.Module:
    """A pruned copy of ``model`` that keeps exactly what ``plan`` keeps.

    ``geometry`` is ``model``'s, when the caller has it already (read from the model otherwise).
    Raises PlanError when the plan does not fit the model.
    """
    geometry = describe(model) if geometry is None else geometry
    plan.check(geometry)
    pruned = copy.deepcopy(model)
    family = family_of(pruned)
    for block, block_plan, block_geometry in zip(family.blocks(pruned), plan.blocks, geometry.blocks):
        family.set_attention(block, get_kind(block_geometry.kind).slice(family.attention(block), block_plan))
        family.slice_mlp(block, block_plan.mlp)
    return pruned
