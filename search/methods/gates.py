"""Pruning indicators: learnable soft gates for the q/k and v channels of every head, and per MLP unit.

Two forms of the attention indicators (``AcpConfig.indicator``):
- ``shared``: one logit per channel index, shared by every head of the block. The soft model the
  search trains then has the structure of the cut it ends in: surgery removes the same channel
  indices from every head, and so does a closing gate here.
- ``free``: one logit per (head, channel). The search may close a channel in one head only, and
  equal removal is imposed afterwards, when the solver sums the scores over heads.

Parametrisation (our choice): gate = sigmoid(logit). A sigmoid keeps every
gate in (0, 1), so the expected kept width of a group is simply the sum of its gates, and the
expected MACs (linear in every width) are differentiable without a straight-through trick. Logits
start high (gates near 1: the search starts from the dense model) and are set per channel by the
attention-difference initialisation when it is on.

Where the gates act is up to each block's attention kind (``search.attention``) for the q/k and v
groups, and on the MLP's hidden activation (before fc2) for MLP units. They are applied by forward
hooks, so the model's own forward runs unchanged.

When heads were chosen first (``--method dsp+acp``), the gates of every removed head are held at 0
(a fixed mask, no gradient), the expected MACs count the kept heads only, and the search works on
the channels of the kept heads. Head masks (``head_gated``) act through each kind's ``head_gate``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Protocol

import torch
from torch import nn

from search.attention import get_kind, measurable
from search.budget.cost import CostModel
from search.families import get_family
from search.methods.importance import BlockScores
from search.budget.macs import ModelGeometry, block_macs
from search.cut.blocks import BlockWidths, KeptHeads


class Gates(Protocol):
    """Anything that gates a model while a distillation student runs (channel gates, head masks)."""

    def gating(self, model: nn.Module) -> ContextManager[nn.Module]:
        """A context within which ``model``'s forward is gated."""


class ChannelGates(nn.Module):
    """Gate logits for every prunable group of a model.

    Args:
        geometry: the dense model's geometry (sets the shape of every gate tensor).
        init: optional per-block initial logits; defaults to ``init_logit`` everywhere.
        init_logit: the constant starting logit when ``init`` is None.
        heads: the heads each block keeps (all when None); the gates of the others are held at 0.
        shared: one q/k and one v logit per channel index, shared by every head (the ``shared``
            indicator); per-head initial logits are averaged over the kept heads.
    """

    def __init__(self, geometry: ModelGeometry, init: tuple[BlockScores, ...] | None = None, init_logit: float = 3.0,
                 heads: KeptHeads | None = None, shared: bool = False) -> None:
        super().__init__()
        self.geometry = geometry
        qk, v, mlp = [], [], []
        self.kept_heads = tuple(g.attention.num_heads if heads is None else len(heads[i]) for i, g in enumerate(geometry.blocks))
        for i, g in enumerate(geometry.blocks):
            a = g.attention
            kept = torch.ones(a.num_heads)
            if heads is not None:
                kept = torch.zeros(a.num_heads)
                kept[list(heads[i])] = 1.0
            self.register_buffer(f"kept_{i}", kept, persistent=False)
            if init is None:
                q0, v0 = torch.full((a.num_heads, a.qk_dim), init_logit), torch.full((a.num_heads, a.v_dim), init_logit)
                mlp.append(torch.full((g.mlp_hidden,), init_logit))
            else:
                q0, v0 = init[i].qk.float().clone(), init[i].v.float().clone()
                mlp.append(init[i].mlp.float().clone())
            if shared:
                rows = kept.bool() if kept.any() else torch.ones(a.num_heads, dtype=torch.bool)
                q0, v0 = q0[rows].mean(0), v0[rows].mean(0)
            qk.append(q0)
            v.append(v0)
        self.qk = nn.ParameterList(nn.Parameter(t) for t in qk)
        self.v = nn.ParameterList(nn.Parameter(t) for t in v)
        self.mlp = nn.ParameterList(nn.Parameter(t) for t in mlp)

    def head_mask(self, block: int) -> torch.Tensor:
        """(heads,) 1 for the heads block ``block`` keeps, 0 for the ones removed before the search."""
        return getattr(self, f"kept_{block}")

    def values(self, block: int) -> BlockScores:
        """The gates of one block, in (0, 1); exactly 0 in every head removed before the search."""
        kept = self.head_mask(block)[:, None]  # (heads, 1): a shared (channels,) gate broadcasts over the heads
        return BlockScores(qk=torch.sigmoid(self.qk[block]) * kept, v=torch.sigmoid(self.v[block]) * kept,
                           mlp=torch.sigmoid(self.mlp[block]))

    def gating(self, model: nn.Module) -> ContextManager[nn.Module]:
        """``gated(model, self)``: the gates act within the context."""
        return gated(model, self)

    def _widths(self, block: int) -> BlockWidths:
        """Soft widths of one block as float64 tensors: per kept head for q/k and v, in units for the MLP."""
        s, heads = self.values(block), self.kept_heads[block]
        per_head = max(heads, 1)  # no head kept: the qk and v sums are 0, and so are the attention MACs
        return BlockWidths(heads=heads, qk=s.qk.double().sum() / per_head, v=s.v.double().sum() / per_head,
                           mlp=s.mlp.double().sum())

    def expected_macs(self) -> torch.Tensor:
        """Differentiable MACs at the soft widths, batch 1.

        A group's soft width per head is the sum of its gates over the kept heads, divided by the
        kept head count; the block's kind counts its MACs at those widths exactly as it counts a real
        cut (its formula is polynomial in the widths, so it takes tensors as well as integers).
        """
        total = torch.tensor(float(self.geometry.fixed_macs), dtype=torch.float64, device=self.qk[0].device)
        for i in range(len(self.geometry.blocks)):
            total = total + block_macs(self.geometry, i, self._widths(i))
        return total

    def expected_cost(self, cost: CostModel) -> torch.Tensor:
        """Differentiable cost of the soft widths under ``cost`` (MACs, or a measured latency table).

        The same soft widths as :meth:`expected_macs`; a latency table interpolates its measured
        curves piecewise-linearly, so the gradient of a width is its segment's slope.
        """
        total = torch.tensor(float(cost.fixed(self.geometry)), dtype=torch.float64, device=self.qk[0].device)
        for i in range(len(self.geometry.blocks)):
            total = total + cost.block(self.geometry, i, self._widths(i))
        return total

    def soft_widths(self) -> tuple[BlockWidths, ...]:
        """The widths the search converged to, per block (floats; the solver rounds them under the budget)."""
        with torch.no_grad():
            return tuple(
                BlockWidths(heads=w.heads, qk=float(w.qk), v=float(w.v), mlp=float(w.mlp))
                for w in map(self._widths, range(len(self.geometry.blocks)))
            )

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

            handles += measurable(get_kind(g.kind), f"block {i}").gate(family.attention(block), values)
            handles.append(family.mlp_activation(block).register_forward_hook(_act_hook(gates, i)))
        yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def head_gated(model: nn.Module, geometry: ModelGeometry, masks: Callable[[int], torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block, head h of block i has its output scaled by ``masks(i)[h]``; hooks removed on exit.

    Each block's attention kind places the mask (``MeasurableKind.head_gate``): a mask of 0 acts like
    removing the head, as surgery will.
    """
    family = get_family(geometry.family)
    handles = []
    try:
        for i, (block, g) in enumerate(zip(family.blocks(model), geometry.blocks)):
            handles += measurable(get_kind(g.kind), f"block {i}").head_gate(family.attention(block), lambda i=i: masks(i))
        yield model
    finally:
        for h in handles:
            h.remove()
