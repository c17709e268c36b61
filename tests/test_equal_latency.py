"""The quality bench's MAC-budget row of equal measured latency, on a tiny real model.

The model, plan, export and latency table are real; only the timing is replaced, so that what is
measured (the MAC ratio plus a fixed overhead) is known and the budget's one correction can be
checked exactly.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from exporter.bench.equal_latency import equal_latency_run
from exporter.onnx_macs import count_onnx_macs
from exporter.pipeline import RunConfig

OVERHEAD = 0.05
"""Stand-in latency ratio above the MAC ratio: what a fixed part (embedding, norms) costs."""


@pytest.fixture
def timed_as_macs(monkeypatch, tmp_path: Path) -> list[float]:
    import exporter.pipeline as pipeline

    monkeypatch.setenv("PRUNE_EXPORT_OFFLINE", "1")
    monkeypatch.setenv("PRUNE_EXPORT_CACHE", str(tmp_path / "cache"))
    measured: list[float] = []

    def mac_ratio_plus_overhead(cfg, target, dense, pruned, input_size, latencies, runs):
        ratio = count_onnx_macs(pruned[0]) / count_onnx_macs(dense[0]) + OVERHEAD
        measured.append(ratio)
        return {"measured_ratio": ratio, "noise": 0.005, "dense_ms": 1.0, "pruned_ms": ratio, "runs": runs, "measured_by": "test"}

    monkeypatch.setattr(pipeline, "measure_target", mac_ratio_plus_overhead)
    return measured


def _cfg(tmp_path: Path, runs: int = 2) -> RunConfig:
    return RunConfig("test_vit", 0.7, tmp_path / "m.onnx", method="magnitude", random_init=True, target_runtime="ort",
                     latency_runs=runs, threads=1, calib_images=4, align=1)


def test_the_mac_budget_is_scaled_once_by_the_latency_missed(tmp_path: Path, timed_as_macs: list[float]) -> None:
    twin = {"latency_measured": 0.70, "mac_ratio": 0.70}
    report = equal_latency_run(_cfg(tmp_path), twin, Console(quiet=True))
    tries = report["equal_latency_tries"]
    assert [t["latency_measured"] for t in tries] == pytest.approx(timed_as_macs)
    # The first try at the twin's MAC ratio measures about OVERHEAD too slow; the second budget is
    # the first scaled by goal / measured, and it lands within the overhead's share of the goal.
    assert len(tries) == 2 and tries[0]["mac_budget"] == 0.7 and tries[0]["latency_measured"] > 0.7 + 0.03
    assert tries[1]["mac_budget"] == pytest.approx(0.7 * 0.7 / tries[0]["latency_measured"], abs=1e-4)
    assert abs(tries[1]["latency_measured"] - 0.7) < abs(tries[0]["latency_measured"] - 0.7)
    assert report["plan"]["budget"] == tries[1]["mac_budget"] and report["latency_model"]["cost"] == "macs"


def test_rows_without_measured_latency_are_refused(tmp_path: Path, timed_as_macs: list[float]) -> None:
    with pytest.raises(ValueError, match="latency_runs > 0"):
        equal_latency_run(_cfg(tmp_path, runs=0), {"latency_measured": 0.7, "mac_ratio": 0.7}, Console(quiet=True))
    with pytest.raises(ValueError, match="latency_runs > 0"):
        equal_latency_run(_cfg(tmp_path), {"latency_measured": None, "mac_ratio": 0.7}, Console(quiet=True))
    assert timed_as_macs == []
