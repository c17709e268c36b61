"""Pruning indicators: a learnable soft gate per (head, channel) for q/k and v, and per MLP unit.

Parametrisation (our choice): gate = sigmoid(logit). A sigmoid keeps every
gate in (0, 1), so the expected kept width of a group is simply the sum of its gates, and the
expected MACs (linear in every width) are differentiable without a straight-through trick. Logits
start high (gates near 1: the search starts from the dense model) and are set per channel by the
attention-difference initialisation when it is on.

Where the gates act is up to each block's attention kind (``search.attention``) for the q/k and v
groups, and on the MLP's hidden activation (before fc2) for MLP units. They are applied by forward
hooks, so the model's own forward runs unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from search.attention import get_kind
from search.families import get_family
from search.importance import BlockScores
from search.macs import BlockWidths, ModelGeometry, block_macs


class ChannelGates(nn.Module):
    """Gate logits for every prunable group of a model.

    Args:
        geometry: the dense model's geometry (sets the shape of every gate tensor).
        init: optional per-block initial logits; defaults to ``init_logit`` everywhere.
        init_logit: the constant starting logit when ``init`` is None.
    """

    def __init__(self, geometry: ModelGeometry, init: tuple[BlockScores, ...] | None = None, init_logit: float = 3.0) -> None:
        super().__init__()
        self.geometry = geometry
        qk, v, mlp = [], [], []
        for i, g in enumerate(geometry.blocks):
            a = g.attention
            if init is None:
                qk.append(torch.full((a.num_heads, a.qk_dim), init_logit))
                v.append(torch.full((a.num_heads, a.v_dim), init_logit))
                mlp.append(torch.full((g.mlp_hidden,), init_logit))
            else:
                qk.append(init[i].qk.float().clone())
                v.append(init[i].v.float().clone())
                mlp.append(init[i].mlp.float().clone())
        self.qk = nn.ParameterList(nn.Parameter(t) for t in qk)
        self.v = nn.ParameterList(nn.Parameter(t) for t in v)
        self.mlp = nn.ParameterList(nn.Parameter(t) for t in mlp)

    def values(self, block: int) -> BlockScores:
        """The gates of one block, in (0, 1)."""
        return BlockScores(qk=torch.sigmoid(self.qk[block]), v=torch.sigmoid(self.v[block]), mlp=torch.sigmoid(self.mlp[block]))

    def expected_macs(self) -> torch.Tensor:
        """Differentiable MACs at the soft widths, batch 1.

        A group's soft width per head is the sum of its gates over the heads, divided by the head
        count; the block's kind counts its MACs at those widths exactly as it counts a real cut
        (its formula is polynomial in the widths, so it takes tensors as well as integers).
        """
        total = torch.tensor(float(self.geometry.fixed_macs), dtype=torch.float64, device=self.qk[0].device)
        for i, g in enumerate(self.geometry.blocks):
            s, heads = self.values(i), g.attention.num_heads
            widths = BlockWidths(heads=heads, qk=s.qk.double().sum() / heads, v=s.v.double().sum() / heads, mlp=s.mlp.double().sum())
            total = total + block_macs(self.geometry, i, widths)
        return total

    def scores(self) -> tuple[BlockScores, ...]:
        """Detached gate values per block, the indicator part of the final ranking."""
        with torch.no_grad():
            return tuple(BlockScores(qk=s.qk.cpu(), v=s.v.cpu(), mlp=s.mlp.cpu()) for s in map(self.values, range(len(self.qk))))


def _act_hook(gates: ChannelGates, block: int):
    def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * gates.values(block).mlp.to(out.dtype)

    return hook


@contextlib.contextmanager
def gated(model: nn.Module, gates: ChannelGates) -> Iterator[nn.Module]:
    """Within the block, ``model``'s forward applies ``gates``; the hooks are removed on exit.

    Each block's attention kind places its q/k and v gates; the MLP gates act on the family's
    hidden activation.
    """
    family = get_family(gates.geometry.family)
    handles = []
    try:
        for i, (block, g) in enumerate(zip(family.blocks(model), gates.geometry.blocks)):
            def values(i: int = i) -> tuple[torch.Tensor, torch.Tensor]:
                v = gates.values(i)
                return v.qk, v.v

            handles += get_kind(g.kind).gate(family.attention(block), values)
            handles.append(family.mlp_activation(block).register_forward_hook(_act_hook(gates, i)))
        yield model
    finally:
        for h in handles:
            h.remove()
