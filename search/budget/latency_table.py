"""A measured latency model of one model geometry on one target: the data, and the cost it predicts.

``exporter.latency_model`` times single blocks (the token input of a block to its output) at kept
widths on a grid, and the fixed parts (the model with no block: patch embedding, final norm, head),
and stores them here. A block's latency at any widths is predicted from four one-dimensional
curves measured around the dense block, each interpolated piecewise-linearly:

    ms(h, qk, v, mlp) = dense + Δheads(h) + (h / H)·(Δqk(qk) + Δv(v)) + Δmlp(mlp)

where Δg(x) is the latency of the dense block with only group g at x, minus the same curve's
latency at the dense width (each curve is its own reference, so the noise of one dense timing does
not shift every curve). The q/k and v deltas are measured with all H heads and scale with the heads kept, since
every op they change (projections, the q·k and attention·v products) runs once per head. Each
curve is made non-decreasing (``search.budget.cost.isotonic``) before use: noise never makes a cut look
slower than no cut. Where a robust straight line explains a curve's medians to within their noise
(a shared machine), the line is used instead of the medians (``fit_curve``).

The whole model is then ``fixed + Σ blocks + overhead``, where ``overhead`` is the dense whole
graph's measured latency minus the sum of its parts in the same interleaved run (a graph runs its
blocks without one call per block, so the parts over-count a little). The dense model's predicted
latency is therefore its measured one, and a plan's predicted ratio is predicted / dense.

A block timed on its own does not save exactly what the same cut saves inside the whole graph,
and not by one factor for every group: on deit_b (ORT CPU, paired rounds) cutting v to 8 saved
4.9 ms alone and 3.9 ms per block inside the graph, halving the MLP 8.0 ms alone and 9.3 ms inside.
A solver trading importance against time then piles its cut on whichever group's saving is
overstated, and the plan runs slower than predicted. So four whole models are timed in the same
run, each with one group cut in every block (half the heads; q/k at 8; v at 8; half the MLP), and
each sets ``group_scale[g]``, the factor on that group's predicted savings that matches its
measured saving (clamped to [0.5, 2]). A fifth whole model (q/k, v and MLP halved together) is
left out of the fit and checks it. ``additivity`` records each, before and after calibration.

The table is plain data (JSON) and imports no torch: soft widths (torch scalars) pass through
:func:`search.budget.cost.interpolate` untouched, so acp's budget term is differentiable in latency too.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from search.core.atomic import atomic_path
from search.core.errors import UserError
from search.budget.cost import interpolate, isotonic, total_of
from search.budget.macs import BlockGeometry, ModelGeometry
from search.cut.blocks import BlockWidths

FORMAT = "prune-export/latency-table"
VERSION = 1
GROUPS = ("heads", "qk", "v", "mlp")
ALIGN_CANDIDATES = (8, 16, 32, 64)


class LatencyTableError(UserError):
    """A latency table that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Curve:
    """Latency (ms) of a block with one group's width varied: measured medians and the fit that is used.

    ``fit`` says which: ``interpolated`` (the medians made non-decreasing) or ``linear`` (a least-squares
    line, when it explains the medians to within their noise; see :func:`fit_curve`).
    """

    widths: tuple[float, ...]
    raw_ms: tuple[float, ...]
    ms: tuple[float, ...] = ()
    fit: str = "interpolated"

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.raw_ms) or not self.widths:
            raise LatencyTableError("a latency curve needs one measured latency per width")
        if list(self.widths) != sorted(set(self.widths)):
            raise LatencyTableError("latency curve widths must be ascending and unique")
        if not self.ms:
            object.__setattr__(self, "ms", isotonic(self.raw_ms))

    def at(self, width: Any) -> Any:
        """Predicted ms at ``width`` (a number or a torch scalar)."""
        return interpolate(self.widths, self.ms, width)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Intercept and slope of the Theil-Sen line: the median of the slopes between every two points.

    One median that noise threw far off (a neighbour's burst landed in its pair) moves a least-squares
    line a lot when it sits at an end of the grid, and the solver then piles its cut on that end;
    the median slope ignores it.
    """
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    slope = _median(slopes) if slopes else 0.0
    return _median([y - slope * x for x, y in zip(xs, ys)]), slope


def fit_curve(widths: Sequence[float], raw_ms: Sequence[float], noise_ms: float, keep_first: bool = False) -> Curve:
    """The curve a table uses for one group: a line where the medians allow it, else the medians themselves.

    On a quiet machine the medians are precise and their shape (a kernel that changes at some width)
    is worth keeping: they are interpolated, made non-decreasing. On a shared machine a median
    scatters by more than neighbouring widths differ, and interpolating that noise would let one bad
    point decide a whole plan: when a robust line (Theil-Sen) leaves residuals (root mean square)
    within twice the typical ``noise_ms`` of a median, the line is used instead. ``keep_first`` keeps
    the first point out of the line (no head at all removes the norm and the projections too, a step
    no line through the other head counts describes).
    """
    xs, ys = list(map(float, widths)), list(map(float, raw_ms))
    head, body_x, body_y = ([], xs, ys) if not keep_first else ([ys[0]], xs[1:], ys[1:])
    if len(body_x) >= 3:
        a, b = _line(body_x, body_y)
        rms = (sum((y - a - b * x) ** 2 for x, y in zip(body_x, body_y)) / len(body_x)) ** 0.5
        if rms <= 2 * noise_ms:
            fitted = head + [a + b * x for x in body_x]
            return Curve(tuple(xs), tuple(ys), isotonic(fitted), "linear")
    return Curve(tuple(xs), tuple(ys), isotonic(ys), "interpolated")


def _block_key(kind: str, heads: int, qk: int, v: int, mlp: int) -> str:
    return f"{kind}/h{heads}/qk{qk}/v{v}/mlp{mlp}"


def block_key(g: BlockGeometry) -> str:
    """Which curves price a block: its attention kind and dense widths."""
    a = g.attention
    return _block_key(g.kind, a.num_heads, a.qk_dim, a.v_dim, g.mlp_hidden)


@dataclass(frozen=True)
class BlockCurves:
    """The measured curves of one dense block shape (every block of that shape shares them)."""

    kind: str
    num_heads: int
    qk_dim: int
    v_dim: int
    mlp_hidden: int
    dense_ms: float
    heads: Curve
    qk: Curve
    v: Curve
    mlp: Curve

    @property
    def key(self) -> str:
        return _block_key(self.kind, self.num_heads, self.qk_dim, self.v_dim, self.mlp_hidden)

    def delta(self, group: str, width: Any) -> Any:
        """The curve of ``group`` at ``width`` minus the same curve at the dense width."""
        curve = getattr(self, group)
        return curve.at(width) - curve.ms[-1]

    def ms(self, w: BlockWidths, scale: dict[str, float] | None = None) -> Any:
        """Predicted latency of this block at ``w``, each group's saving times ``scale[group]`` (1 when absent)."""
        k = {g: 1.0 for g in GROUPS} | (scale or {})
        share = w.heads / self.num_heads
        return self.dense_ms + k["heads"] * self.delta("heads", w.heads) \
            + share * (k["qk"] * self.delta("qk", w.qk) + k["v"] * self.delta("v", w.v)) + k["mlp"] * self.delta("mlp", w.mlp)


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency model of one geometry on one target; a :class:`search.budget.cost.CostModel`.

    Attributes:
        key: the cache key (geometry, target, machine, grid), a hex digest.
        target: what was timed: runtime, device or provider, precision, batch, threads, and the
            machine (CPU model, instruction sets), as ``exporter.latency_model`` records it.
        fixed_ms: the model with no block.
        overhead_ms: dense whole graph minus the sum of its parts (same interleaved run).
        whole_ms: the dense whole graph.
        blocks: curves per distinct block shape.
        align: the alignment the target runs fastest at (``--align auto``), from ``align_probe``.
        align_probe: the MLP widths timed for the alignment, their ms and the penalty per alignment.
        additivity: whole graphs measured against the parts' prediction, for the report.
        runs: interleaved rounds behind every median.
        parts: every timed part's median and noise (ms), by name, for audit and re-fitting.
        group_scale: per group, the factor on the blocks' predicted savings (see the module docstring).
    """

    key: str
    target: dict[str, Any]
    fixed_ms: float
    overhead_ms: float
    whole_ms: float
    blocks: tuple[BlockCurves, ...]
    align: int = 8
    align_probe: dict[str, Any] = field(default_factory=dict)
    additivity: dict[str, Any] = field(default_factory=dict)
    runs: int = 0
    parts: dict[str, Any] = field(default_factory=dict)
    group_scale: dict[str, float] = field(default_factory=dict)

    name = "latency"
    unit = "ms"

    @property
    def label(self) -> str:
        t = self.target
        return f"latency on {t.get('label', t.get('runtime', '?'))}"

    def curves(self, g: BlockGeometry) -> BlockCurves:
        key = block_key(g)
        for b in self.blocks:
            if b.key == key:
                return b
        raise LatencyTableError(f"the latency table has no curves for a {key} block; rebuild it for this model")

    def block(self, geometry: ModelGeometry, index: int, widths: BlockWidths) -> Any:
        return self.curves(geometry.blocks[index]).ms(widths, self.group_scale)

    def fixed(self, geometry: ModelGeometry) -> float:
        return self.fixed_ms + self.overhead_ms

    def total(self, geometry: ModelGeometry, widths: Sequence[BlockWidths] | None = None) -> Any:
        return total_of(self, geometry, geometry.dense_widths() if widths is None else widths)

    def check(self, geometry: ModelGeometry) -> None:
        """LatencyTableError unless every block of ``geometry`` has curves here."""
        for g in geometry.blocks:
            self.curves(g)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencyTable":
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise LatencyTableError(f"not a {FORMAT} v{VERSION} file")
        try:
            def curve(c: dict[str, Any]) -> Curve:
                return Curve(tuple(map(float, c["widths"])), tuple(map(float, c["raw_ms"])), tuple(map(float, c["ms"])),
                             str(c.get("fit", "interpolated")))

            blocks = tuple(
                BlockCurves(kind=b["kind"], num_heads=int(b["num_heads"]), qk_dim=int(b["qk_dim"]), v_dim=int(b["v_dim"]),
                            mlp_hidden=int(b["mlp_hidden"]), dense_ms=float(b["dense_ms"]),
                            **{g: curve(b[g]) for g in GROUPS})
                for b in data["blocks"]
            )
            return cls(key=str(data["key"]), target=dict(data["target"]), fixed_ms=float(data["fixed_ms"]),
                       overhead_ms=float(data["overhead_ms"]), whole_ms=float(data["whole_ms"]), blocks=blocks,
                       align=int(data["align"]), align_probe=dict(data.get("align_probe", {})),
                       additivity=dict(data.get("additivity", {})), runs=int(data.get("runs", 0)),
                       parts=dict(data.get("parts", {})),
                       group_scale={str(k): float(v) for k, v in data.get("group_scale", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise LatencyTableError(f"latency table is malformed ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: Path) -> "LatencyTable":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LatencyTableError(f"latency table {path} cannot be read ({exc}); delete it to rebuild") from None
        try:
            return cls.from_dict(data)
        except LatencyTableError as exc:
            raise LatencyTableError(f"latency table {path}: {exc}; delete it to rebuild") from None


SCALE_RANGE = (0.5, 2.0)


def fit_scale(predicted: float, measured: float) -> float:
    """k with measured = k × predicted (savings, in ms), clamped to :data:`SCALE_RANGE`; 1 when nothing was predicted."""
    if predicted <= 0:
        return 1.0
    return min(max(measured / predicted, SCALE_RANGE[0]), SCALE_RANGE[1])


def choose_align(widths: Sequence[int], ms: Sequence[float], noise_ms: float, share: float = 0.5) -> tuple[int, dict[str, float]]:
    """The alignment a target runs fast, from latencies at every width a multiple of 8 across one 64-step.

    ``widths`` run from ``lo`` to ``lo + 64`` in steps of 8, ``lo`` a multiple of 64. Were cost
    linear in width, every width would sit on the chord between the two ends. A kernel that pads
    widths to a multiple of 2a runs a width that is a multiple of ``a`` but not of 2a as slowly as
    the next multiple of 2a: ``a`` units' worth above the chord. The penalty of that class (a = 8,
    16, 32) is its mean height above the chord in units of ``a`` units' worth (the chord's slope
    times ``a``): about 1 when the class is padded, about 0 when it is not. The answer is the
    smallest alignment whose class and every coarser class stay below ``share``; a height within
    ``noise_ms`` counts as none, and a step of 64 whose cost is within twice the noise (a block
    whose time is mostly call overhead) resolves nothing: the answer is then 8.

    Returns the alignment and the penalty of each class, for the table and the report.
    """
    if len(widths) != 9 or any(b - a != 8 for a, b in zip(widths, widths[1:])) or widths[0] % 64:
        raise ValueError("the alignment probe needs widths lo, lo+8, ..., lo+64 with lo a multiple of 64")
    lo, hi, t_lo, t_hi = widths[0], widths[-1], ms[0], ms[-1]
    if t_hi - t_lo <= 2 * noise_ms:  # the step itself is lost in the noise (a block ruled by call overhead)
        return ALIGN_CANDIDATES[0], {str(a): 0.0 for a in ALIGN_CANDIDATES[:-1]}
    slope = (t_hi - t_lo) / (hi - lo)
    excess = {w: t - (t_lo + (w - lo) * slope) for w, t in zip(widths, ms)}
    penalties: dict[str, float] = {}
    for a in ALIGN_CANDIDATES[:-1]:
        members = [w for w in widths[1:-1] if w % a == 0 and w % (2 * a) != 0]
        mean = sum(excess[w] for w in members) / len(members)
        penalties[str(a)] = mean / (a * slope) if mean > noise_ms else 0.0
    chosen = ALIGN_CANDIDATES[-1]
    for a in reversed(ALIGN_CANDIDATES[:-1]):
        if penalties[str(a)] >= share:
            break
        chosen = a
    return chosen, penalties
