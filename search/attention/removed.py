"""No attention: what stands in a block that kept no head after head pruning.

Head pruning (``--method dsp``) may remove every head of a block. Surgery then removes the block's
attention branch altogether (the model family rebuilds the block as residual + MLP), and the
block's ``attn`` slot holds a :class:`RemovedAttention`: no weights, never run, and recognised by
this kind so that a pruned model is still described, counted and checked like any other.

- **Shape.** The token width, and 0 heads of 0 channels.
- **MACs.** None: the exported graph computes nothing for this attention.
- Nothing to gate, capture, measure or reweight; slicing keeps it only for a plan that keeps no head.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from search.attention.base import (
    AttentionActivations,
    AttentionKind,
    AttentionShape,
    GateValues,
    HeadValues,
    HeadWeights,
    TokenLayout,
    register_kind,
)
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

    def head_weights(self, module: nn.Module) -> HeadWeights:
        empty = torch.zeros(0, 0, module.dim)
        return HeadWeights(q=empty, k=empty, v=empty, proj=torch.zeros(module.dim, 0, 0))

    def gate(self, module: nn.Module, values: GateValues) -> list[RemovableHandle]:
        return []

    def head_gate(self, module: nn.Module, values: HeadValues) -> list[RemovableHandle]:
        return []

    def capture(self, module: nn.Module, sink: Callable[[AttentionActivations], None]) -> list[RemovableHandle]:
        raise ValueError("a block without attention has nothing to capture; search the dense model")

    def attention_differences(self, module: nn.Module, acts: AttentionActivations) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("a block without attention has no channel to measure")

    def slice(self, module: nn.Module, plan: BlockPlan) -> nn.Module:
        if plan.heads:
            raise PlanError("a block without attention cannot keep heads")
        return module

    def reweight_target(self, module: nn.Module) -> nn.Linear:
        raise ValueError("a block without attention has no layer to fold a reweight into")


register_kind(RemovedAttentionKind())
