"""measure_latency times models interleaved and reports medians; it asserts nothing about speed."""
from __future__ import annotations

from pathlib import Path

import pytest

from exporter.timing import LatencyResult, machine_info, measure_latency
from exporter.onnx_export import export_onnx
from tests.conftest import tiny_vit


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("latency")
    return {
        "small": export_onnx(tiny_vit(depth=1), folder / "small.onnx", (3, 32, 32)),
        "large": export_onnx(tiny_vit(depth=3), folder / "large.onnx", (3, 32, 32)),
    }


def test_measure_latency(two_models: dict[str, Path]) -> None:
    result = measure_latency(
        two_models, batch=2, threads=1, runs=7, warmup=1, input_size=(3, 32, 32), progress=False
    )
    assert isinstance(result, LatencyResult)
    assert set(result.median_ms) == {"small", "large"}
    assert all(ms > 0 for ms in result.median_ms.values())
    assert all(len(times) == 7 for times in result.samples_ms.values())
    assert (result.runs, result.batch, result.threads) == (7, 2, 1)
    assert result.provider == "CPUExecutionProvider"
    assert result.ratio("small", "small") == 1.0
    assert result.ratio("small", "large") == result.median_ms["small"] / result.median_ms["large"]
    assert result.machine["onnxruntime"]
    with pytest.raises(KeyError, match="nope"):
        result.ratio("nope", "small")


def test_progress_bar_runs(two_models: dict[str, Path]) -> None:
    result = measure_latency(
        two_models, batch=1, threads=1, runs=2, warmup=0, input_size=(3, 32, 32)
    )
    assert all(len(times) == 2 for times in result.samples_ms.values())


def test_bad_settings_are_refused(two_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError):
        measure_latency(two_models, batch=1, threads=1, runs=0, input_size=(3, 32, 32))
    with pytest.raises(ValueError):
        measure_latency({}, batch=1, threads=1)


def test_machine_info() -> None:
    info = machine_info()
    assert info["cpu_count"] >= 1
    assert {"cpu_model", "platform", "onnxruntime", "torch"} <= set(info)
