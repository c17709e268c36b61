"""Head selection, shared by every head-pruning method: how many heads are kept, where, and which.

- **How many.** K heads in the whole model, given (``--heads K``) or derived from the budget
  (:func:`heads_for_budget`): the largest K whose *head-only* pruned model (every kept head whole,
  every MLP unit kept) keeps at most that fraction of the dense cost: MACs, or the latency a
  measured table predicts on the target (``search.budget.cost``), where a head's share of the time may
  differ from its share of the MACs (softmax, per-head overheads).
- **Where** (the scope). ``layer``: every block keeps its share of K, fixed before the search
  (:func:`layer_counts`: K split in proportion to the blocks' head counts, by largest remainder;
  with equal blocks, the blocks that get one head more are the first ones). ``global``: the K best
  heads of the whole model wherever they are, so a block may keep every head or none.
- **Which.** The K heads with the highest scores within their scope (:func:`top_heads`); ties go to
  the lower head index. DSP scores heads by their learned logits (``search.methods.dsp``); the
  ``head-magnitude`` baseline by the squared L2 norm of the weights a head owns.

A block that keeps no head loses its attention branch in surgery (``search.families``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from search.attention import kind_of, measurable
from search.core.choices import HEAD_SCOPES
from search.core.errors import BudgetError, OptionError
from search.families import family_of
from search.budget.cost import MACS, CostModel
from search.budget.macs import ModelGeometry
from search.cut.blocks import BlockWidths, KeptHeads

SCOPES = HEAD_SCOPES


@dataclass(frozen=True)
class HeadTarget:
    """How many heads to keep and over which scope they are chosen.

    Attributes:
        total: K, the heads kept in the whole model.
        scope: ``layer`` (each block keeps its share of K) or ``global`` (the K best heads anywhere).
        source: how K was set, for the terminal and the report (``--heads``, or the budget it fits).
    """

    total: int
    scope: str = "layer"
    source: str = "--heads"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise OptionError(f"--heads-scope must be one of {', '.join(SCOPES)}, got '{self.scope}'")
        if self.total < 0:
            raise OptionError(f"--heads must be 0 or more, got {self.total}")

    def describe(self, geometry: ModelGeometry) -> str:
        """One line: K of N heads, the scope and, per layer, the share of every block."""
        where = "the best anywhere (global scope)"
        if self.scope == "layer":
            counts = layer_counts(geometry, self.total)
            where = f"per layer {'/'.join(map(str, counts))}" if len(set(counts)) > 1 else f"{counts[0]} in each block"
        return f"keep {self.total} of {total_heads(geometry)} heads ({where}; K from {self.source})"


def total_heads(geometry: ModelGeometry) -> int:
    """Heads of the whole dense model."""
    return sum(g.attention.num_heads for g in geometry.blocks)


def check_total(geometry: ModelGeometry, total: int) -> None:
    """OptionError unless 0 ≤ ``total`` ≤ the model's heads."""
    n = total_heads(geometry)
    if not 0 <= total <= n:
        raise OptionError(f"--heads {total} is out of range: the model has {n} heads; give 0 to {n}")


def layer_counts(geometry: ModelGeometry, total: int) -> tuple[int, ...]:
    """K split over the blocks in proportion to their heads, by largest remainder (ties: earlier block first).

    Exact integer arithmetic; the counts sum to ``total`` and never exceed a block's heads.
    """
    check_total(geometry, total)
    sizes = [g.attention.num_heads for g in geometry.blocks]
    n = sum(sizes)
    if n == 0:
        return tuple(0 for _ in sizes)
    counts = [total * h // n for h in sizes]
    remainders = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % n), i))
    for i in remainders[: total - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


def head_only_widths(geometry: ModelGeometry, counts: Sequence[int]) -> tuple[BlockWidths, ...]:
    """Widths of the model that keeps ``counts[i]`` whole heads in block i and every MLP unit."""
    return tuple(
        BlockWidths(heads=c, qk=w.qk if c else 0, v=w.v if c else 0, mlp=w.mlp) for c, w in zip(counts, geometry.dense_widths())
    )


def head_costs(geometry: ModelGeometry, cost: CostModel = MACS) -> tuple[float, ...]:
    """Cost of one whole head in each block, the block's other heads removed.

    Every MAC term is linear in the head count, so under MACs this is every head's cost; a measured
    latency need not be linear, and the first head of a block (which brings back its norm and
    projections) is then its most expensive one, the price :func:`heads_for_budget` assumes.
    """
    empty = cost.total(geometry, head_only_widths(geometry, [0] * len(geometry.blocks)))
    costs = []
    for i in range(len(geometry.blocks)):
        one = [0] * len(geometry.blocks)
        one[i] = 1
        costs.append(cost.total(geometry, head_only_widths(geometry, one)) - empty)
    return tuple(costs)


def heads_for_budget(geometry: ModelGeometry, budget: float, scope: str, cost: CostModel = MACS) -> int:
    """The largest K whose head-only model keeps at most ``budget`` of the dense cost (MACs by default).

    Layer scope: the model with :func:`layer_counts` heads. Global scope: the blocks the K heads
    land in are known only after the search, so K is priced at its worst case, the K most expensive
    heads; any choice of K heads then fits. In a ViT every head costs the same MACs, so this is exact
    under MACs; with mixed attention kinds (a FLatten ``--pattern``) or a measured latency it is
    conservative.

    Raises:
        BudgetError: even the model without any head exceeds the budget.
    """
    dense = cost.total(geometry)
    n = total_heads(geometry)
    empty = cost.total(geometry, head_only_widths(geometry, [0] * len(geometry.blocks)))
    if empty > budget * dense:
        option = "--budget" if cost.name == "macs" else "--latency-budget"
        raise BudgetError(
            f"budget {budget:g} is out of reach by removing heads alone: the model without any head keeps "
            f"{empty / dense:.3f} of the {cost.label}; raise {option}, or use --method dsp+acp to cut channels as well"
        )
    if scope == "global":
        per_head = sorted((c for g, c in zip(geometry.blocks, head_costs(geometry, cost)) for _ in range(g.attention.num_heads)),
                          reverse=True)
        macs, k = empty, 0
        while k < n and macs + per_head[k] <= budget * dense:
            macs += per_head[k]
            k += 1
        return k
    for k in range(n, -1, -1):
        if cost.total(geometry, head_only_widths(geometry, layer_counts(geometry, k))) <= budget * dense:
            return k
    return 0  # unreachable: k = 0 fits (checked above)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores; ties go to the lower index."""
    order = torch.sort(scores.detach().double().cpu(), descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def top_heads(scores: Sequence[torch.Tensor], target: HeadTarget, geometry: ModelGeometry) -> KeptHeads:
    """The heads to keep: the highest ``scores`` (one (heads,) tensor per block) within the target's scope."""
    check_total(geometry, target.total)
    if target.scope == "layer":
        return tuple(tuple(_top(s, k)) for s, k in zip(scores, layer_counts(geometry, target.total)))
    flat = torch.cat([s.detach().double().cpu().reshape(-1) for s in scores])
    chosen = _top(flat, target.total)
    kept: list[list[int]] = [[] for _ in scores]
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + s.numel())
    for c in chosen:
        block = next(i for i in range(len(scores)) if offsets[i] <= c < offsets[i + 1])
        kept[block].append(c - offsets[block])
    return tuple(tuple(k) for k in kept)


@torch.no_grad()
def head_magnitude_scores(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """(heads,) per block: the squared L2 norm of every weight a head owns (its q, k, v rows and proj columns).

    The score of the ``head-magnitude`` baseline: the heads with the lowest magnitude go first.
    """
    family = family_of(model)
    scores = []
    for block in family.blocks(model):
        attn = family.attention(block)
        w = measurable(kind_of(attn)).head_weights(attn)
        scores.append(w.q.float().pow(2).sum((1, 2)) + w.k.float().pow(2).sum((1, 2)) + w.v.float().pow(2).sum((1, 2))
                      + w.proj.float().pow(2).sum((0, 2)))
    return tuple(scores)
