"""The budget solver: share kept widths out across blocks so the plan fits a budget exactly.

The budget is a fraction of a cost model's dense cost (``search.budget.cost``): MACs by default, or the
latency a measured table predicts on a target (``search.budget.latency_table``). Starting from the dense
model, it removes one ``align``-sized chunk at a time from whichever (block, group) loses the least
normalised importance per unit of cost saved, until cost ≤ budget × dense. Widths therefore differ
between blocks, every pruned width is a multiple of ``align`` (GEMM kernels stay fast), and no
width falls below ``align``. Costs are evaluated exactly under the model (MACs are integers), so
the final plan never exceeds the budget it was solved for.

Scores are divided by their group's mean per (head, channel) or per unit, which makes a q/k chunk
(align channels in each of H heads) and an MLP chunk (align units) comparable: both cost roughly
their element count in importance, and the MAC price decides.

When heads were chosen first (head pruning, ``--method dsp`` and ``dsp+acp``), the solver starts
from those heads instead of all of them: a block keeps ``heads[i]`` at dense widths, only their
channels are scored and cut, and a block that keeps no head has no q/k or v group left. A head-only
plan that already fits the budget is returned with every kept head whole.

A search that converged to widths of its own (acp's soft widths) can set them instead of the greedy
pass: ``round_widths`` rounds each to the alignment and then corrects the total to the exact budget,
changing first the groups whose rounding moved them furthest from their target.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from search.attention import get_kind
from search.core.errors import BudgetError, PlanError
from search.methods.importance import BlockScores
from search.budget.cost import MACS, CostModel
from search.budget.macs import ModelGeometry, model_macs
from search.cut.blocks import BlockPlan, BlockWidths, KeptHeads
from search.budget.plan import Plan

GROUPS = ("qk", "v", "mlp")


@dataclass(frozen=True)
class SolverConfig:
    """How the solver turns scores into a plan.

    Attributes:
        budget: fraction of the dense cost (MACs, or latency under a table) to keep, in (0, 1].
        align: kept widths are multiples of this (dense widths may stay as they are).
        per_head_indices: choose q/k and v indices in each head separately (same count per head)
            instead of the same indices in every head.
        normalise: divide scores by their group's mean first. Needed for scores whose scale differs
            between blocks (weight magnitudes); off for scores already on one scale (acp's gates),
            where it would erase the cross-block allocation the search learned.
    """

    budget: float
    align: int = 8
    per_head_indices: bool = False
    normalise: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise BudgetError(f"budget must be in (0, 1], got {self.budget}; e.g. --budget 0.63 keeps 63% of the MACs")
        if self.align < 1:
            raise BudgetError(f"--align must be a positive integer, got {self.align}")


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.double().clamp_min(0)
    return scores / scores.mean().clamp_min(1e-30)


def _removal_costs(scores: torch.Tensor, per_head: bool, normalise: bool) -> torch.Tensor:
    """Ascending cost of removing the 1st, 2nd, ... channel position of a group.

    For heads x channels scores, removing one position removes one channel in every head: with shared
    indices that is the lowest head-summed index; per head, each head's own lowest channel.
    """
    s = _normalised(scores) if normalise else scores.double().clamp_min(0)
    if s.dim() == 1:
        return s.sort().values
    if per_head:
        return s.sort(dim=1).values.sum(0)
    return s.sum(0).sort().values


def _next_width(width: int, align: int) -> int | None:
    nxt = ((width - 1) // align) * align
    return nxt if nxt >= align else None


def start_widths(geometry: ModelGeometry, heads: KeptHeads | None = None) -> tuple[BlockWidths, ...]:
    """Where the solver starts: the dense widths, with only the kept heads when ``heads`` is given."""
    if heads is None:
        return geometry.dense_widths()
    if len(heads) != len(geometry.blocks):
        raise PlanError(f"{len(heads)} kept-head sets for {len(geometry.blocks)} blocks")
    return tuple(
        BlockWidths(heads=len(kept), qk=w.qk, v=w.v, mlp=w.mlp) if kept else BlockWidths(heads=0, qk=0, v=0, mlp=w.mlp)
        for kept, w in zip(heads, geometry.dense_widths())
    )


def min_widths(geometry: ModelGeometry, align: int, heads: KeptHeads | None = None) -> tuple[BlockWidths, ...]:
    """The smallest widths the solver may reach: ``align`` everywhere (or the start width, if narrower)."""
    return tuple(
        BlockWidths(heads=w.heads, qk=min(w.qk, align), v=min(w.v, align), mlp=min(w.mlp, align))
        for w in start_widths(geometry, heads)
    )


def _check_floor(geometry: ModelGeometry, config: SolverConfig, heads: KeptHeads | None, target: float, dense: float,
                 cost: CostModel) -> None:
    """BudgetError (naming the fix) when even the smallest aligned model is above ``target``."""
    floor = float(cost.total(geometry, min_widths(geometry, config.align, heads)))
    if floor > target:
        kept = "" if heads is None else f" and the {sum(map(len, heads))} heads chosen"
        option = "--budget" if cost.name == "macs" else "--latency-budget"
        raise BudgetError(
            f"budget {config.budget:g} is unreachable: the smallest model with widths aligned to "
            f"{config.align}{kept} keeps {floor / dense:.3f} of the {cost.label}; raise {option} or lower --align"
            + ("" if heads is None else " (or keep fewer heads)")
        )


def solve_widths(
    geometry: ModelGeometry, scores: tuple[BlockScores, ...], config: SolverConfig, heads: KeptHeads | None = None,
    cost: CostModel = MACS,
) -> tuple[BlockWidths, ...]:
    """Kept widths per block with cost ≤ budget × dense; raises BudgetError when unreachable.

    ``heads``: the heads each block keeps (all when None); only their channels are scored and cut.
    ``cost``: what the budget is a fraction of (MACs by default).
    """
    dense = cost.total(geometry)
    target = config.budget * dense
    _check_floor(geometry, config, heads, target, dense, cost)
    kept_rows = [list(range(g.attention.num_heads)) if heads is None else list(heads[i]) for i, g in enumerate(geometry.blocks)]
    costs = [
        {g: _removal_costs(getattr(s, g) if g == "mlp" else getattr(s, g)[rows], config.per_head_indices, config.normalise)
         for g in GROUPS if g == "mlp" or rows}
        for s, rows in zip(scores, kept_rows)
    ]
    widths = list(start_widths(geometry, heads))
    full_widths = tuple(widths)
    spent = cost.total(geometry, full_widths)
    tiny = 1e-12 * float(dense)  # a move that saves nothing (a flat stretch of a measured curve) still ranks, last
    while spent > target:
        best: tuple[float, int, str, int, float] | None = None
        for i, w in enumerate(widths):
            dense_w = full_widths[i]
            for g in costs[i]:
                cur = getattr(w, g)
                nxt = _next_width(cur, config.align)
                if nxt is None:
                    continue
                full = getattr(dense_w, g)
                lost = float(costs[i][g][full - cur : full - nxt].sum())
                saved = cost.block(geometry, i, w) - cost.block(geometry, i, replace(w, **{g: nxt}))
                ratio = lost / max(float(saved), tiny)
                if best is None or ratio < best[0]:
                    best = (ratio, i, g, nxt, saved)
        assert best is not None, "floor check guarantees a move exists while above target"
        _, i, g, nxt, saved = best
        widths[i] = replace(widths[i], **{g: nxt})
        spent = spent - saved if cost is MACS else cost.total(geometry, widths)
    return tuple(widths)


def _step_up(width: int, full: int, align: int) -> int | None:
    if width >= full:
        return None
    return min(full, (width // align + 1) * align)


def _nearest(target: float, full: int, floor: int, align: int) -> int:
    """The allowed width (a multiple of ``align`` from ``floor`` up, or ``full``) nearest ``target``."""
    allowed = sorted({*range(floor, full + 1, align), full}) if floor < full else [full]
    return min(allowed, key=lambda w: (abs(w - target), -w))


def round_widths(
    geometry: ModelGeometry, targets: tuple[BlockWidths, ...], config: SolverConfig, heads: KeptHeads | None = None,
    cost: CostModel = MACS,
) -> tuple[BlockWidths, ...]:
    """Aligned widths nearest the (fractional) ``targets``, with cost ≤ budget × dense.

    Each q/k, v and MLP width is first rounded to the nearest allowed width (multiples of ``align``,
    or the start width). Then, while over budget, one step is taken off the group whose width lies
    furthest above its target, relative to its start width; and while a step fits, one is added to
    the group lying furthest below it, so the plan uses the budget as the greedy solver does.
    Raises BudgetError when the budget is unreachable at this alignment.
    """
    dense = cost.total(geometry)
    target = config.budget * dense
    _check_floor(geometry, config, heads, target, dense, cost)
    full = start_widths(geometry, heads)
    floor = min_widths(geometry, config.align, heads)
    widths = [
        replace(f, **{g: _nearest(float(getattr(t, g)), getattr(f, g), getattr(lo, g), config.align) for g in GROUPS if getattr(f, g)})
        for f, lo, t in zip(full, floor, targets)
    ]

    def gap(i: int, g: str) -> float:
        return (float(getattr(targets[i], g)) - getattr(widths[i], g)) / getattr(full[i], g)

    spent = cost.total(geometry, tuple(widths))
    while spent > target:
        moves = [(i, g, nxt) for i, w in enumerate(widths) for g in GROUPS
                 if getattr(full[i], g) and (nxt := _next_width(getattr(w, g), config.align)) is not None
                 and nxt >= getattr(floor[i], g)]
        i, g, nxt = min(moves, key=lambda m: gap(m[0], m[1]))
        widths[i] = replace(widths[i], **{g: nxt})
        spent = cost.total(geometry, tuple(widths))
    while True:
        moves = []
        for i, w in enumerate(widths):
            for g in GROUPS:
                up = _step_up(getattr(w, g), getattr(full[i], g), config.align)
                if up is not None and spent - cost.block(geometry, i, w) + cost.block(geometry, i, replace(w, **{g: up})) <= target:
                    moves.append((i, g, up))
        if not moves:
            return tuple(widths)
        i, g, up = max(moves, key=lambda m: gap(m[0], m[1]))
        widths[i] = replace(widths[i], **{g: up})
        spent = cost.total(geometry, tuple(widths))


def _top(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    return tuple(sorted(torch.topk(scores.double(), k, sorted=False).indices.tolist()))


def select_indices(scores: BlockScores, widths: BlockWidths, per_head: bool, heads: tuple[int, ...] | None = None) -> BlockPlan:
    """Keep the highest-scoring channels of one block's kept ``heads`` (all when None) at the given widths."""
    heads = tuple(range(scores.qk.shape[0])) if heads is None else tuple(heads)

    def rows(s: torch.Tensor, k: int) -> tuple[tuple[int, ...], ...]:
        if not heads:
            return ()
        if per_head:
            return tuple(_top(s[h], k) for h in heads)
        return (_top(s[list(heads)].double().sum(0), k),) * len(heads)

    return BlockPlan(heads=heads, qk=rows(scores.qk, widths.qk), v=rows(scores.v, widths.v), mlp=_top(scores.mlp, widths.mlp))


def make_plan(
    geometry: ModelGeometry,
    scores: tuple[BlockScores, ...],
    config: SolverConfig,
    *,
    model: str,
    img_size: int,
    method: str,
    heads: KeptHeads | None = None,
    targets: tuple[BlockWidths, ...] | None = None,
    cost: CostModel = MACS,
) -> Plan:
    """Solve widths under the budget and pick the indices to keep: the search's final Plan.

    ``heads``: the heads each block keeps, when a head-pruning method chose them (all when None).
    ``targets``: widths a search converged to; they are rounded under the budget (``round_widths``)
    instead of being re-derived from the scores (``solve_widths``).
    ``cost``: what the budget is a fraction of; a plan under a latency table records its predicted ratio.
    """
    shared = sorted({g.kind for g in geometry.blocks if get_kind(g.kind).shared_v_indices})
    if config.per_head_indices and shared:
        raise PlanError(
            f"--per-head-indices cannot prune {', '.join(shared)} attention: a part shared by its heads (the DWC) "
            "reads the v channels, so every head must keep the same ones; drop --per-head-indices"
        )
    widths = solve_widths(geometry, scores, config, heads, cost) if targets is None else \
        round_widths(geometry, targets, config, heads, cost)
    kept = (None,) * len(widths) if heads is None else heads
    blocks = tuple(select_indices(s, w, config.per_head_indices, h) for s, w, h in zip(scores, widths, kept))
    plan = Plan(
        model=model,
        img_size=img_size,
        method=method,
        budget=config.budget,
        align=config.align,
        dense_macs=model_macs(geometry),
        pruned_macs=model_macs(geometry, widths),
        blocks=blocks,
        **_cost_fields(cost, geometry, widths),
    )
    plan.check(geometry, model)
    return plan


def head_plan(
    geometry: ModelGeometry,
    heads: KeptHeads,
    budget: float,
    *,
    model: str,
    img_size: int,
    method: str,
    align: int = 1,
    cost: CostModel = MACS,
) -> Plan:
    """The Plan that keeps ``heads`` whole (every channel of a kept head, every MLP unit) and nothing else.

    What a heads-only method (``dsp``, ``head-magnitude``) produces. Its cost follows from the heads;
    BudgetError when it exceeds ``budget`` × dense (the caller chose too many heads for it). ``align``
    is only recorded: no width is cut, and dense widths may stay as they are under any align.
    """
    widths = start_widths(geometry, heads)
    dense, pruned = model_macs(geometry), model_macs(geometry, widths)
    spent, whole = float(cost.total(geometry, widths)), float(cost.total(geometry))
    if spent > budget * whole:
        raise BudgetError(
            f"keeping {sum(map(len, heads))} whole heads leaves {spent / whole:.3f} of the {cost.label}, above the budget "
            f"{budget:g}; keep fewer heads (--heads), or use --method dsp+acp to cut channels as well"
        )
    blocks = tuple(
        BlockPlan(heads=tuple(kept), qk=(tuple(range(g.attention.qk_dim)),) * len(kept),
                  v=(tuple(range(g.attention.v_dim)),) * len(kept), mlp=tuple(range(g.mlp_hidden)))
        for kept, g in zip(heads, geometry.blocks)
    )
    plan = Plan(model=model, img_size=img_size, method=method, budget=budget, align=align, dense_macs=dense, pruned_macs=pruned,
                blocks=blocks, **_cost_fields(cost, geometry, widths))
    plan.check(geometry, model)
    return plan


def _cost_fields(cost: CostModel, geometry: ModelGeometry, widths: tuple[BlockWidths, ...]) -> dict[str, object]:
    """The plan's record of its cost model: nothing for MACs, the predicted ratio and table for latency."""
    if cost.name == "macs":
        return {}
    return {"cost": cost.name, "cost_ratio": float(cost.total(geometry, widths)) / float(cost.total(geometry)),
            "cost_table": getattr(cost, "key", None)}
