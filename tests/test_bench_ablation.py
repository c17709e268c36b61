"""The ablation bench's arithmetic: paired differences over seeds, the verdict, and valid rows."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from exporter.bench.ablation import DENSE_FINAL, markdown, summarise, variants, verdict, BenchConfig
from exporter.input_checks import check_acp_options
from exporter.pipeline import RunConfig
from search.methods.acp import AcpConfig


def _row(name, budget, seed, before, after):
    return {"name": name, "budget": budget, "seed": seed, "before": before, "after": after, "mac_ratio": budget}


def _rows():
    # acp moves with the seed (the images); "switch" trails it by exactly 1 point on every seed,
    # "noisy" by 1 point on average but with a spread of 2
    acp = {0: 0.70, 1: 0.74, 2: 0.72}
    rows = [_row("acp", 0.63, s, a - 0.03, a) for s, a in acp.items()]
    rows += [_row("switch", 0.63, s, a - 0.04, a - 0.01) for s, a in acp.items()]
    rows += [_row("worse", 0.63, s, a - 0.04, a - 0.03) for s, a in acp.items()]
    rows += [_row("noisy", 0.63, s, a - 0.03, a + d) for (s, a), d in zip(acp.items(), (-0.03, 0.01, -0.01))]
    rows += [_row("dense", 1.0, s, 0.70, 0.70) for s in acp]
    rows += [_row(DENSE_FINAL, 1.0, s, 0.69, 0.72) for s in acp]
    return rows


def test_differences_are_paired_by_seed_and_must_beat_the_seed_to_seed_spread_of_the_row():
    by = {(e["name"], e["budget"]): e for e in summarise(_rows())}
    switch = by[("switch", 0.63)]
    assert switch["after_vs_acp"][0] == pytest.approx(-0.01) and switch["after_vs_acp"][1] == pytest.approx(0.0, abs=1e-12)
    assert switch["after"][1] == pytest.approx(0.02)  # the row's own spread over seeds: 2 points
    assert verdict(switch, "after") == "within spread"  # a steady 1-point gap is not beyond a 2-point spread
    assert verdict(by[("worse", 0.63)], "after") == "acp better"


def test_a_gap_smaller_than_its_spread_is_called_within_spread():
    by = {(e["name"], e["budget"]): e for e in summarise(_rows())}
    assert verdict(by[("noisy", 0.63)], "after") == "within spread"


def test_rows_are_compared_with_dense_and_with_dense_through_the_same_recovery():
    by = {(e["name"], e["budget"]): e for e in summarise(_rows())}
    acp = by[("acp", 0.63)]
    assert acp["after_vs_dense"][0] == pytest.approx(0.02)
    assert acp["after_vs_retrained"][0] == pytest.approx(0.0)
    table = markdown(summarise(_rows()), BenchConfig(), {"seeds": [0, 1, 2], "defaults": "x", "machine": {}, "created": "now"})
    assert "| acp | 0.63 | 3 | 0.630 | 69.0 ± 2.0 |  |  | 72.0 ± 2.0 |" in table


def test_one_seed_gives_no_verdict():
    rows = [_row("acp", 0.5, 0, 0.7, 0.75), _row("switch", 0.5, 0, 0.6, 0.70)]
    by = {e["name"]: e for e in summarise(rows)}
    assert verdict(by["switch"], "after") == "one seed: no spread"


def test_each_acp_row_switches_one_part_and_makes_a_valid_run():
    d = AcpConfig(budget=1.0)
    switched = [v for v in variants() if v.method == "acp" and v.overrides]
    assert {k for v in switched for k in v.overrides} == {"indicator", "widths", "gate_optimiser", "similarity", "attn_init", "reweight"}
    assert all(len(v.overrides) == 1 for v in switched)
    defaults = {"indicator": d.indicator, "widths": d.widths, "gate_optimiser": d.optimiser,
                "similarity": True, "attn_init": True, "reweight": True}
    for v in switched:
        cfg = replace(RunConfig("dinov2_s", 0.63, Path("x.onnx"), method="acp"), **v.overrides)
        check_acp_options(cfg)
        (field, value), = v.overrides.items()
        assert value != defaults[field], f"{v.name} does not switch {field} away from the default"
