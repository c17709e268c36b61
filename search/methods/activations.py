"""Capture what each block computes on a calibration batch: its attention's q, k, v and its MLP hidden units.

Similarity weights and the attention-difference initialisation both read these, so they are
captured once, in one pass of the dense model, by hooks that each block's attention kind and the
model's family place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from search.attention import AttentionActivations, get_kind, measurable
from search.families import get_family
from search.budget.macs import ModelGeometry


@dataclass(frozen=True)
class BlockActivations:
    """One block's activations on a calibration batch (fp32, on the model's device).

    Attributes:
        attention: q, k (batch, heads, tokens, qk_dim) and v (batch, heads, tokens, v_dim), where
            the block's attention kind captures them.
        hidden: (batch, tokens, mlp_hidden) MLP activations after the non-linearity.
    """

    attention: AttentionActivations
    hidden: torch.Tensor

    @property
    def q(self) -> torch.Tensor:
        return self.attention.q

    @property
    def k(self) -> torch.Tensor:
        return self.attention.k

    @property
    def v(self) -> torch.Tensor:
        return self.attention.v


@torch.no_grad()
def capture(model: nn.Module, geometry: ModelGeometry, images: torch.Tensor) -> tuple[BlockActivations, ...]:
    """Run ``model`` on ``images`` once and return every block's activations."""
    family = get_family(geometry.family)
    attention: dict[int, AttentionActivations] = {}
    hidden: dict[int, torch.Tensor] = {}
    handles = []
    for i, (block, g) in enumerate(zip(family.blocks(model), geometry.blocks)):
        kind = measurable(get_kind(g.kind), f"block {i}")
        handles += kind.capture(family.attention(block), lambda acts, i=i: attention.__setitem__(i, acts))
        handles.append(family.mlp_activation(block).register_forward_hook(
            lambda _m, _a, out, i=i: hidden.__setitem__(i, out.detach().float())))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return tuple(BlockActivations(attention=attention[i], hidden=hidden[i]) for i in range(len(geometry.blocks)))
