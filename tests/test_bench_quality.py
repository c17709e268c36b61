"""The quality bench's bookkeeping: a partial run refreshes its rows and keeps the others."""
from __future__ import annotations

import json

from exporter.bench.quality import measured_on, merged, rows


def test_a_partial_run_replaces_its_rows_in_place_and_appends_new_ones(tmp_path):
    previous = tmp_path / "quality.json"
    previous.write_text(json.dumps({"rows": [{"row": "dense", "knn_top1": 0.7}, {"row": "acp @ 0.63", "knn_top1": 0.75},
                                             {"row": "random @ 0.63", "knn_top1": 0.74}]}))
    fresh = [{"row": "dense", "knn_top1": 0.71}, {"row": "acp @ 0.63", "knn_top1": 0.76}, {"row": "new", "knn_top1": 0.6}]
    out = merged(fresh, previous)
    assert [(r["row"], r["knn_top1"]) for r in out] == [("dense", 0.71), ("acp @ 0.63", 0.76), ("random @ 0.63", 0.74), ("new", 0.6)]


def test_merged_rows_keep_the_machine_that_measured_them(tmp_path):
    from exporter.bench.quality import _machine_lines

    earlier = {"cpu_model": "AMD EPYC", "cpus_usable": 2}
    now = {"cpu_model": "Intel Xeon", "cpus_usable": 2, "instruction_sets": ["AVX2"]}
    previous = tmp_path / "quality.json"
    previous.write_text(json.dumps({"meta": {"machine": earlier, "created": "2026-11-23"},
                                    "rows": [{"row": "dense"}, {"row": "acp @ 0.63"}, {"row": "x", "measured_on": "older"}]}))
    stamp = measured_on(now, "2026-11-27")
    out = merged([{"row": "dense", "measured_on": stamp}], previous)
    assert [r["measured_on"] for r in out] == [stamp, measured_on(earlier, "2026-11-23"), "older"]
    lines = _machine_lines(out, {"machine": now, "created": "2026-11-27"})
    assert len(lines) == 4 and "Intel Xeon" in lines[1] and "`dense`" in lines[1] and "`acp @ 0.63`" in lines[2]
    assert len(_machine_lines(out[:1], {"machine": now, "created": "2026-11-27"})) == 1  # one machine: one line


def test_a_first_partial_run_keeps_just_its_rows(tmp_path):
    fresh = [{"row": "dense", "knn_top1": 0.71}]
    assert merged(fresh, tmp_path / "missing.json") == fresh


def test_the_no_data_rows_compare_builtin_images_with_no_recovery():
    by_name = {r.name: r for r in rows(quick=True)}
    assert by_name["acp @ 0.63, built-in images (no --data)"].overrides == {"data": None}
    assert by_name["acp @ 0.63, no recovery"].overrides == {"finetune_steps": 0}


def test_the_head_pruning_rows_make_valid_runs():
    from dataclasses import replace
    from pathlib import Path

    from exporter.input_checks import check_head_options
    from exporter.pipeline import RunConfig

    by_name = {r.name: r for r in rows(quick=True)}
    for name in ("acp @ 0.63", "dsp @ 0.63", "dsp+acp @ 0.63", "dsp @ 50% of heads", "head-magnitude @ 50% of heads"):
        row = by_name[name]
        cfg = replace(RunConfig("dinov2_s", 1.0, Path("x.onnx")), method=row.method, budget=row.budget, **row.overrides)
        check_head_options(cfg)
    assert by_name["dsp @ 50% of heads"].overrides == by_name["head-magnitude @ 50% of heads"].overrides == {"heads": 36}
    assert by_name["dsp @ 50% of heads"].budget == 1.0


def test_onlymatches_row_a_substring_or_an_exact_name():
    from exporter.bench.quality import matches_row

    assert matches_row("FLatten", "acp @ 0.63, FLatten") and matches_row("=acp @ 0.63", "acp @ 0.63")
    assert not matches_row("=acp @ 0.63", "acp @ 0.63, FLatten")
