"""Surgery: turn a dense model and a Plan into a physically smaller model.

The result is an ordinary timm VisionTransformer whose attention modules are sliced by their
kind's slicer and whose MLPs have fewer hidden units. The input model is left untouched.
"""
from __future__ import annotations

import copy

from torch import nn

from exporter.slicing import ATTENTION_SLICERS, slice_mlp
from search.macs import describe
from search.plan import Plan


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """A pruned copy of ``model`` that keeps exactly what ``plan`` keeps.

    Raises PlanError when the plan does not fit the model.
    """
    geometry = describe(model)
    plan.check(geometry)
    pruned = copy.deepcopy(model)
    for block, block_plan, block_geometry in zip(pruned.blocks, plan.blocks, geometry.blocks):
        block.attn = ATTENTION_SLICERS[block_geometry.kind](block.attn, block_plan)
        slice_mlp(block.mlp, block_plan.mlp)
    return pruned
