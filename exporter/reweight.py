"""The reweight module: a learnable map on the kept channels that compensates for the cut.

It sits directly in front of a linear layer, so after recovery it folds exactly into that layer's
weights and the exported graph has no reweight op:
- attention: a v_dim × v_dim block per head on the attention output, in the ``reweight`` slot in
  front of the layer the block's attention kind names (``reweight_target``: ``proj``). Never in
  front of q: a non-linear map such as FLatten's focusing function would not let it fold;
- MLP: a scale per hidden unit, in the slot the model family puts in front of the second linear layer.
Both start as the identity, so adding them changes nothing until recovery trains them.
"""
from __future__ import annotations

import torch
from torch import nn

from search.attention import kind_of
from search.families import family_of


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
    """Insert identity reweights in every block, in place; returns the model."""
    family = family_of(model)
    for block in family.blocks(model):
        attn = family.attention(block)
        shape = kind_of(attn).shape(attn)
        if shape.num_heads > 0:  # a block that kept no head has no attention to reweight
            if not hasattr(attn, "reweight"):
                raise TypeError("reweights go on a model after surgery (attention modules with a reweight slot)")
            device = kind_of(attn).reweight_target(attn).weight.device
            attn.reweight = HeadReweight(shape.num_heads, shape.v_dim).to(device)
        fc2 = family.mlp_linears(block)[1]
        family.set_mlp_reweight(block, UnitScale(fc2.in_features).to(fc2.weight.device))
    return model


@torch.no_grad()
def fold_reweights(model: nn.Module) -> nn.Module:
    """Fold every reweight into the following linear layer and remove it, in place.

    target(R x) = (W R) x: column block h of the target becomes W_h R_h. fc2(s ⊙ x) = (W diag(s)) x.
    """
    family = family_of(model)
    for block in family.blocks(model):
        attn = family.attention(block)
        if isinstance(getattr(attn, "reweight", None), HeadReweight):
            r = attn.reweight.weight
            target = kind_of(attn).reweight_target(attn)
            w = target.weight.reshape(target.out_features, r.shape[0], r.shape[1])
            target.weight.copy_(torch.einsum("dho,hoi->dhi", w, r).reshape_as(target.weight))
            attn.reweight = nn.Identity()
        scale = family.mlp_reweight(block)
        if isinstance(scale, UnitScale):
            family.mlp_linears(block)[1].weight.mul_(scale.weight)
            family.set_mlp_reweight(block, nn.Identity())
    return model
