"""The reweight module: a learnable map on the kept channels that compensates for the cut.

It sits directly in front of a linear layer, so after recovery it folds exactly into that layer's
weights and the exported graph has no reweight op:
- attention: a v_dim × v_dim block per head on the attention output, in front of ``proj``;
- MLP: a scale per hidden unit, in front of ``fc2`` (timm's Mlp has a ``norm`` slot exactly there).
Both start as the identity, so adding them changes nothing until recovery trains them.
"""
from __future__ import annotations

import torch
from torch import nn

from exporter.pruned_attention import PrunedAttention


class HeadReweight(nn.Module):
    """x[..., h, :] ← R_h x[..., h, :] for every head h; R starts as the identity."""

    def __init__(self, heads: int, width: int) -> None:
        super().__init__()
        self.heads, self.width = heads, width
        self.weight = nn.Parameter(torch.eye(width).repeat(heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(*shape[:-1], self.heads, self.width)
        return torch.einsum("...hi,hoi->...ho", x, self.weight).reshape(shape)


class UnitScale(nn.Module):
    """x ← s ⊙ x with one scale per unit; s starts at 1."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def add_reweights(model: nn.Module) -> nn.Module:
    """Insert identity reweights in every pruned block, in place; returns the model."""
    for block in model.blocks:
        attn = block.attn
        if not isinstance(attn, PrunedAttention):
            raise TypeError("reweights go on a model after surgery (PrunedAttention blocks)")
        device = attn.proj.weight.device
        attn.reweight = HeadReweight(attn.num_heads, attn.v_dim).to(device)
        block.mlp.norm = UnitScale(block.mlp.fc2.in_features).to(device)
    return model


@torch.no_grad()
def fold_reweights(model: nn.Module) -> nn.Module:
    """Fold every reweight into the following linear layer and remove it, in place.

    proj(R x) = (W R) x: column block h of proj becomes W_h R_h. fc2(s ⊙ x) = (W diag(s)) x.
    """
    for block in model.blocks:
        attn = block.attn
        if isinstance(getattr(attn, "reweight", None), HeadReweight):
            r = attn.reweight.weight
            w = attn.proj.weight.reshape(attn.proj.out_features, attn.num_heads, attn.v_dim)
            attn.proj.weight.copy_(torch.einsum("dho,hoi->dhi", w, r).reshape_as(attn.proj.weight))
            attn.reweight = nn.Identity()
        if isinstance(getattr(block.mlp, "norm", None), UnitScale):
            block.mlp.fc2.weight.mul_(block.mlp.norm.weight)
            block.mlp.norm = nn.Identity()
    return model
