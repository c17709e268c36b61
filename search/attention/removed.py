"""No attention: what stands in a block that kept no head after head pruning.

Head pruning (``--method dsp``) may remove every head of a block. Surgery then removes the block's
attention branch altogether (the model family rebuilds the block as residual + MLP), and the
block's ``attn`` slot holds a :class:`RemovedAttention`: no weights, never run, and recognised by
this kind so that a pruned model is still described, counted and checked like any other.

- **Shape.** The token width, and 0 heads of 0 channels.
- **MACs.** None: the exported graph computes nothing for this attention.
- **Slicing** keeps it, for a plan that keeps no head; there is no layer to fold a reweight into.
- It is a cutting kind only (:class:`AttentionKind`, not :class:`MeasurableKind`): nothing to gate,
  capture or measure, so the search refuses it in one line (``search.attention.measurable``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from search.attention.base import AttentionKind, AttentionShape, TokenLayout, register_kind
from search.core.errors import PlanError

if TYPE_CHECKING:
    from search.cut.blocks import BlockPlan


class RemovedAttention(nn.Module):
    """The attention of a block whose every head was pruned: a marker with the token width, never called.

    Args:
        dim: token width of the block (kept for the geometry).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = 0

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads=0"

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("a removed attention is never run: its block adds the MLP branch to the residual only")


class RemovedAttentionKind(AttentionKind):
    """A block without attention (every head pruned)."""

    name = "removed"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, RemovedAttention)

    def shape(self, module: nn.Module) -> AttentionShape:
        return AttentionShape(embed_dim=module.dim, num_heads=0, qk_dim=0, v_dim=0)

    def macs(self, shape: AttentionShape, heads: int, qk: int, v: int, layout: TokenLayout) -> int:
        return 0

    def slice(self, module: nn.Module, plan: BlockPlan) -> nn.Module:
        if plan.heads:
            raise PlanError("a block without attention cannot keep heads")
        return module

    def reweight_target(self, module: nn.Module) -> None:
        return None


register_kind(RemovedAttentionKind())
