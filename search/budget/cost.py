"""Cost models: what a plan is priced in, MACs (the default) or measured latency on a target.

Every place that used to count MACs to meet a budget (the acp budget term, the head count of the
head-pruning methods, the width solver and its rounding) asks a :class:`CostModel` instead:

- :data:`MACS` counts MACs exactly (``search.budget.macs``), so a MAC budget behaves as it always did;
- :class:`LatencyTable` predicts milliseconds on one target (runtime, device, precision, batch,
  threads, machine) from block latencies measured over a grid of kept widths
  (``search.budget.latency_table``). ``exporter.latency_model`` times and caches the tables, because
  timing needs the runtimes and ``search`` never imports ``exporter``.

Both take integer widths (a plan) and soft widths: floats, or torch scalars whose gradient flows
through the cost, which is what lets acp's budget term be the expected *latency* of the gated
model. Nothing here imports torch: soft widths are only added and multiplied.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from search.budget.macs import ModelGeometry, block_macs, model_macs
from search.cut.blocks import BlockWidths


class CostModel(Protocol):
    """What a budget is a fraction of.

    Attributes:
        name: ``macs`` or ``latency`` (recorded in the plan).
        unit: the unit of :meth:`block` and :meth:`total` (``MACs``, ``ms``).
        label: what a budget fraction keeps, in words ("MACs", "latency on ORT CPU ...").
    """

    name: str
    unit: str
    label: str

    def block(self, geometry: ModelGeometry, index: int, widths: BlockWidths) -> Any:
        """Cost of block ``index`` at ``widths`` (int/float widths give a number, torch scalars a tensor)."""

    def fixed(self, geometry: ModelGeometry) -> float:
        """Cost no plan changes (patch embedding, final norm, head, whatever the blocks do not hold)."""

    def total(self, geometry: ModelGeometry, widths: Sequence[BlockWidths] | None = None) -> Any:
        """Cost of the whole model at ``widths`` (the dense model when None)."""


class MacCost:
    """The analytic MAC count (``search.budget.macs``): exact integers for integer widths."""

    name = "macs"
    unit = "MACs"
    label = "MACs"

    def block(self, geometry: ModelGeometry, index: int, widths: BlockWidths) -> Any:
        return block_macs(geometry, index, widths)

    def fixed(self, geometry: ModelGeometry) -> float:
        return geometry.fixed_macs

    def total(self, geometry: ModelGeometry, widths: Sequence[BlockWidths] | None = None) -> Any:
        if widths is None or all(isinstance(getattr(w, g), int) for w in widths for g in ("qk", "v", "mlp")):
            return model_macs(geometry, None if widths is None else tuple(widths))
        return total_of(self, geometry, widths)

    def __repr__(self) -> str:
        return "MacCost()"


MACS = MacCost()
"""The default cost model."""


def total_of(cost: CostModel, geometry: ModelGeometry, widths: Sequence[BlockWidths]) -> Any:
    """fixed + the sum of the blocks' costs (soft widths allowed)."""
    if len(widths) != len(geometry.blocks):
        raise ValueError(f"{len(widths)} block widths for {len(geometry.blocks)} blocks")
    total: Any = cost.fixed(geometry)
    for i, w in enumerate(widths):
        total = total + cost.block(geometry, i, w)
    return total


def cost_ratio(cost: CostModel, geometry: ModelGeometry, widths: Sequence[BlockWidths]) -> float:
    """Cost of ``widths`` as a fraction of the dense model's."""
    return float(cost.total(geometry, widths)) / float(cost.total(geometry))


def isotonic(values: Sequence[float]) -> tuple[float, ...]:
    """The non-decreasing sequence nearest ``values`` in least squares (pool adjacent violators).

    A latency measured at more kept channels is never truly lower; where noise says otherwise the
    neighbours are pooled to their mean, so the solver never sees a cut that "adds" time.
    """
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: list[float] = []
    for s, c in blocks:
        out.extend([s / c] * int(c))
    return tuple(out)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: Any) -> Any:
    """Piecewise-linear ``y(x)`` through the points (``xs`` ascending), extended linearly past the ends.

    ``x`` may be a float or a torch scalar: the segment is picked from its value and the result is
    ``y0 + (x - x0) * slope``, so the gradient with respect to ``x`` is the segment's slope.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError("interpolate needs as many y as x values, at least one")
    if len(xs) == 1:
        return x * 0 + ys[0]
    value = float(x.detach()) if hasattr(x, "detach") else float(x)
    i = 0
    while i < len(xs) - 2 and value > xs[i + 1]:
        i += 1
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (x - x0) * ((y1 - y0) / (x1 - x0))
