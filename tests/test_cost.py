"""Cost models without timing anything: interpolation, the curve fit, the alignment probe, and the solver,
rounding, head count and acp budget term meeting a latency budget under a synthetic table."""
from __future__ import annotations

import json

import pytest
import torch

from search.budget.allocate import SolverConfig, make_plan, min_widths, round_widths, solve_widths
from search.core.errors import BudgetError
from search.budget.cost import MACS, cost_ratio, interpolate, isotonic
from search.methods.gates import ChannelGates
from search.methods.heads import heads_for_budget, head_only_widths, layer_counts
from search.methods.importance import magnitude_scores
from search.budget.latency_table import BlockCurves, Curve, LatencyTable, LatencyTableError, choose_align, fit_curve
from search.budget.macs import ModelGeometry, describe, model_macs
from search.cut.blocks import BlockWidths
from search.budget.plan import Plan


def test_interpolate_is_piecewise_linear_and_extends_the_end_segments() -> None:
    xs, ys = (8.0, 16.0, 64.0), (1.0, 2.0, 4.0)
    assert interpolate(xs, ys, 8) == 1.0
    assert interpolate(xs, ys, 12) == pytest.approx(1.5)
    assert interpolate(xs, ys, 40) == pytest.approx(3.0)
    assert interpolate(xs, ys, 64) == pytest.approx(4.0)
    assert interpolate(xs, ys, 0) == pytest.approx(0.0)  # below the grid: the first segment's slope
    assert interpolate(xs, ys, 80) == pytest.approx(4 + 16 * 2 / 48)


def test_interpolate_passes_the_gradient_of_a_soft_width() -> None:
    x = torch.tensor(40.0, dtype=torch.float64, requires_grad=True)
    y = interpolate((8.0, 16.0, 64.0), (1.0, 2.0, 4.0), x)
    y.backward()
    assert float(y.detach()) == pytest.approx(3.0)
    assert float(x.grad) == pytest.approx(2.0 / 48)


def test_isotonic_pools_violators_only() -> None:
    assert isotonic([1, 2, 3]) == (1, 2, 3)
    assert isotonic([1, 3, 2, 4]) == pytest.approx((1, 2.5, 2.5, 4))
    assert isotonic([5, 1, 1]) == pytest.approx((7 / 3,) * 3)


def test_fit_curve_takes_a_line_under_noise_and_the_points_when_they_are_precise() -> None:
    widths = [8, 16, 24, 32, 40, 48, 56, 64]
    noisy = [1.0 + 0.1 * w + (0.3 if i % 2 else -0.3) for i, w in enumerate(widths)]
    line = fit_curve(widths, noisy, noise_ms=0.5)
    assert line.fit == "linear"
    assert line.ms[-1] - line.ms[0] == pytest.approx(0.1 * 56, rel=0.1)
    steps = [1.0 if w <= 32 else 2.0 for w in widths]  # a kernel change at 32: real shape, measured precisely
    kept = fit_curve(widths, steps, noise_ms=0.01)
    assert kept.fit == "interpolated" and kept.ms == tuple(steps)
    heads = fit_curve([0, 1, 2, 3, 4], [0.1, 1.0, 1.1, 1.2, 1.3], noise_ms=0.01, keep_first=True)
    assert heads.fit == "linear" and heads.ms[0] == pytest.approx(0.1) and heads.ms[1] == pytest.approx(1.0)


def test_choose_align_finds_padding_and_ignores_noise() -> None:
    widths = list(range(1536, 1601, 8))
    linear = [10 + 0.01 * (w - 1536) for w in widths]
    assert choose_align(widths, linear, noise_ms=0.01)[0] == 8
    padded = [10 + 0.01 * (-(-(w - 1536) // 64) * 64) for w in widths]  # every width runs like the next multiple of 64
    align, penalties = choose_align(widths, padded, noise_ms=0.01)
    assert align == 64 and penalties["32"] >= 0.5
    by16 = [10 + 0.01 * (-(-(w - 1536) // 16) * 16) for w in widths]
    assert choose_align(widths, by16, noise_ms=0.001)[0] == 16
    assert choose_align(widths, padded, noise_ms=5.0)[0] == 8  # differences within the noise do not count
    flat = [10 + (0.3 if w % 64 else 0.0) for w in widths]  # call overhead: no step to resolve padding against
    assert choose_align(widths, flat, noise_ms=0.05)[0] == 8
    with pytest.raises(ValueError):
        choose_align(widths[:-1], linear[:-1], 0.01)


def synthetic_table(geometry: ModelGeometry, mlp_ms_per_unit: float, qk_ms: float, v_ms: float, head_ms: float,
                    fixed_ms: float = 1.0) -> LatencyTable:
    """A table whose block latency is linear in each group, with the given prices (no timing)."""
    blocks = []
    seen = set()
    for g in geometry.blocks:
        d = g.dense
        if (g.kind, d) in seen:
            continue
        seen.add((g.kind, d))
        base = 0.5 + d.heads * head_ms + d.heads * (d.qk * qk_ms + d.v * v_ms) + d.mlp * mlp_ms_per_unit

        def curve(widths, f):
            return Curve(tuple(map(float, widths)), tuple(f(w) for w in widths))

        blocks.append(BlockCurves(
            kind=g.kind, num_heads=d.heads, qk_dim=d.qk, v_dim=d.v, mlp_hidden=d.mlp, dense_ms=base,
            heads=curve(range(d.heads + 1), lambda h: base - (d.heads - h) * (head_ms + d.qk * qk_ms + d.v * v_ms) - (0.2 if h == 0 else 0)),
            qk=curve(range(8, d.qk + 1, 8), lambda w: base - d.heads * (d.qk - w) * qk_ms),
            v=curve(range(8, d.v + 1, 8), lambda w: base - d.heads * (d.v - w) * v_ms),
            mlp=curve(range(8, d.mlp + 1, 8), lambda w: base - (d.mlp - w) * mlp_ms_per_unit),
        ))
    whole = fixed_ms + sum(next(b.dense_ms for b in blocks if b.num_heads == g.attention.num_heads) for g in geometry.blocks)
    return LatencyTable(key="synthetic", target={"label": "synthetic"}, fixed_ms=fixed_ms, overhead_ms=0.0, whole_ms=whole,
                        blocks=tuple(blocks), align=8)


@pytest.fixture
def geometry(test_vit) -> ModelGeometry:
    return describe(test_vit)


def test_synthetic_table_is_exact_where_it_was_built(geometry: ModelGeometry) -> None:
    table = synthetic_table(geometry, 0.01, 0.002, 0.003, 0.05)
    dense = geometry.dense_widths()
    assert table.total(geometry) == pytest.approx(table.whole_ms)
    w = BlockWidths(heads=dense[0].heads, qk=dense[0].qk - 8, v=dense[0].v, mlp=dense[0].mlp - 16)
    expected = table.blocks[0].dense_ms - dense[0].heads * 8 * 0.002 - 16 * 0.01
    assert table.block(geometry, 0, w) == pytest.approx(expected)


@pytest.mark.parametrize("budget", [0.5, 0.7])
def test_solver_meets_a_latency_budget_and_spends_it_where_time_is_cheap(test_vit, geometry: ModelGeometry, budget: float) -> None:
    # MLP units cost a lot of time per MAC on this synthetic target, attention channels little:
    # a latency plan cuts the MLP harder than the MAC plan at the same budget.
    table = synthetic_table(geometry, mlp_ms_per_unit=0.02, qk_ms=0.0005, v_ms=0.0005, head_ms=0.01)
    scores = magnitude_scores(test_vit)
    config = SolverConfig(budget, align=8)
    latency = solve_widths(geometry, scores, config, cost=table)
    assert cost_ratio(table, geometry, latency) <= budget
    assert cost_ratio(table, geometry, latency) > budget - 0.08  # uses the budget, not far below it
    macs = solve_widths(geometry, scores, config)
    assert model_macs(geometry, macs) <= budget * model_macs(geometry)
    assert sum(w.mlp for w in latency) < sum(w.mlp for w in macs)
    targets = tuple(BlockWidths(heads=w.heads, qk=w.qk * 0.6, v=w.v * 0.6, mlp=w.mlp * 0.6) for w in geometry.dense_widths())
    rounded = round_widths(geometry, targets, config, cost=table)
    assert cost_ratio(table, geometry, rounded) <= budget


def test_make_plan_records_the_cost_and_survives_json(test_vit, geometry: ModelGeometry) -> None:
    table = synthetic_table(geometry, 0.02, 0.0005, 0.0005, 0.01)
    plan = make_plan(geometry, magnitude_scores(test_vit), SolverConfig(0.6), model="test_vit", img_size=160,
                     method="magnitude", cost=table)
    assert plan.cost == "latency" and plan.cost_table == "synthetic"
    assert plan.cost_ratio == pytest.approx(cost_ratio(table, geometry, plan.widths())) and plan.cost_ratio <= 0.6
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    mac_plan = make_plan(geometry, magnitude_scores(test_vit), SolverConfig(0.6), model="test_vit", img_size=160, method="magnitude")
    assert "cost" not in mac_plan.to_dict() and mac_plan.cost == "macs"


def test_unreachable_latency_budget_names_the_option(test_vit, geometry: ModelGeometry) -> None:
    table = synthetic_table(geometry, 0.02, 0.0005, 0.0005, 0.01, fixed_ms=100.0)  # the fixed parts dominate
    floor = cost_ratio(table, geometry, min_widths(geometry, 8))
    with pytest.raises(BudgetError, match="--latency-budget"):
        solve_widths(geometry, magnitude_scores(test_vit), SolverConfig(floor * 0.9), cost=table)


def test_head_count_follows_the_time_heads_take(geometry: ModelGeometry) -> None:
    cheap = synthetic_table(geometry, 0.02, 0.0001, 0.0001, 0.0001)  # heads cost almost no time
    with pytest.raises(BudgetError, match="--latency-budget"):
        heads_for_budget(geometry, 0.5, "layer", cheap)  # removing every head cannot halve the time
    dear = synthetic_table(geometry, 0.0001, 0.002, 0.002, 0.2)  # heads are most of the time
    k = heads_for_budget(geometry, 0.5, "layer", dear)
    assert cost_ratio(dear, geometry, head_only_widths(geometry, layer_counts(geometry, k))) <= 0.5
    assert cost_ratio(dear, geometry, head_only_widths(geometry, layer_counts(geometry, k + 1))) > 0.5


def test_acp_budget_term_is_differentiable_in_latency(geometry: ModelGeometry) -> None:
    table = synthetic_table(geometry, 0.02, 0.0005, 0.0005, 0.01)
    gates = ChannelGates(geometry)
    cost = gates.expected_cost(table)
    assert float(cost) == pytest.approx(table.total(geometry), rel=0.05)  # gates start near 1: about dense
    cost.backward()
    assert float(gates.mlp[0].grad.abs().sum()) > 0 and float(gates.qk[0].grad.abs().sum()) > 0
    mac = gates.expected_cost(MACS)
    assert float(mac) == pytest.approx(float(gates.expected_macs()))


def test_table_round_trip_and_bad_files(tmp_path, geometry: ModelGeometry) -> None:
    table = synthetic_table(geometry, 0.02, 0.0005, 0.0005, 0.01)
    path = tmp_path / "t.json"
    table.save(path)
    assert LatencyTable.load(path) == table
    path.write_text("{}")
    with pytest.raises(LatencyTableError, match="delete it to rebuild"):
        LatencyTable.load(path)
    other = describe(__import__("tests.conftest", fromlist=["tiny_vit"]).tiny_vit())
    with pytest.raises(LatencyTableError, match="no curves"):
        table.check(other)


def test_a_table_that_missed_its_held_out_check_warns_a_latency_budget(geometry: ModelGeometry, tmp_path) -> None:
    from dataclasses import replace

    from exporter.stages.config import RunConfig
    from exporter.stages.latency import CHECK_TOLERANCE, table_check_warning

    def checked(calibrated: float, measured: float) -> LatencyTable:
        check = {"calibrated_ratio": calibrated, "measured_ratio": measured, "held_out": True}
        return replace(synthetic_table(geometry, 0.01, 0.002, 0.003, 0.05),
                       additivity={"checked_on": "channels-halved", "channels-halved": check})

    latency = RunConfig("test_vit", 0.6, tmp_path / "m.onnx", latency_budget=0.6)
    missed = table_check_warning(latency, checked(0.670, 0.586))  # the dinov2_s table at 112 px on a 2-core Xeon
    assert missed is not None and "+0.084" in missed and "--budget" in missed
    assert table_check_warning(latency, checked(0.586 + CHECK_TOLERANCE - 1e-6, 0.586)) is None
    assert "-0.040" in table_check_warning(latency, checked(0.546, 0.586))  # too slow is a miss too
    assert table_check_warning(replace(latency, latency_budget=None), checked(0.670, 0.586)) is None  # MAC budgets plan without it
    assert table_check_warning(latency, synthetic_table(geometry, 0.01, 0.002, 0.003, 0.05)) is None  # no check recorded
