"""The latency bench end to end on timm's tiny test_vit, and the --align table's measurement and advice."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from exporter.bench import latency as bench
from exporter.onnx_export import export_onnx
from tests.conftest import tiny_vit


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    pytest.importorskip("torch_pruning", reason="the bench's Torch-Pruning row needs torch-pruning; pip install 'prune-export[bench]'")
    out = tmp_path_factory.mktemp("bench")
    cfg = bench.BenchConfig(
        models=("test_vit",), budgets=(0.63, 1.0), runs_b1={"test_vit": 3}, runs_b8={"test_vit": 2},
        extras=True, profile=True, focus="test_vit", threads=1, confirm_runs=(2, 1), openvino_runs=(3, 2),
    )
    result = bench.run(cfg, out, out / "work", reuse=False, command="pytest", console=Console(quiet=True))
    return result, out


def test_every_artifact_is_built_validated_and_timed(report) -> None:
    result, out = report
    rows = {r["artifact"]: r for r in result["models"][0]["rows"]}
    expected = {"dense-plain", "portable@0.63", "ort@0.63", "int8@0.63", "portable@1", "ort@1", "int8@1",
                "portable-rewritten@0.63", "ort-fused@0.63", "int8-static@0.63", "opset23@0.63", "opset23-dense"}
    assert expected <= set(rows)
    assert any(name.startswith("tp@") for name in rows)
    for name, row in rows.items():
        assert row["ms_b1"] > 0 and row["ms_b8"] > 0, name
        assert row["parity"]["passed"], (name, row["parity"])
    assert rows["dense-plain"]["ratio_b1"] == 1.0
    assert rows["portable@0.63"]["mac_ratio"] == pytest.approx(0.63, abs=0.01)
    tp_row = next(r for n, r in rows.items() if n.startswith("tp@"))
    assert tp_row["mac_ratio"] == pytest.approx(rows["portable@0.63"]["mac_ratio"], rel=0.01)
    assert rows["int8@0.63"]["parity"]["mean_cosine"] >= 0.99


def test_report_files(report) -> None:
    result, out = report
    assert json.loads((out / "latency.json").read_text())["models"][0]["model"] == "test_vit"
    md = (out / "latency.md").read_text()
    assert "Random weights" in md and "| test_vit | portable@0.63 |" in md
    assert "ORT profile by op type" in md and "GPU: not measured" in md
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["goals"]) == 6 and all("test_vit" in g and "goal-check run" in g for g in result["goals"])
    assert result["models"][0]["confirm"]["ratios"]["dense-plain"]["b8"]["ratio"] == 1.0


def test_openvino_column(report) -> None:
    result, out = report
    ov = result["models"][0]["openvino"]
    md = (out / "latency.md").read_text()
    assert "OpenVINO b1 / b8" in md
    if ov["status"] == "not installed":
        pytest.skip("OpenVINO is not installed; pip install 'prune-export[openvino]'")
    assert ov["status"] == "measured" and result["machine"]["openvino"] == ov["version"]
    assert set(ov["ratios"]) | set(ov["errors"]) == {"dense-plain", "portable@0.63", "int8@0.63", "int8-static@0.63"}
    assert ov["ratios"]["dense-plain"]["b1"]["ratio"] == 1.0
    assert ov["cosine_to_ort"]["portable@0.63"] > 0.9999
    for name, figures in ov["ratios"].items():
        assert figures["b1"]["ms"] > 0 and figures["b8"]["ratio"] > 0, name
    assert ov["settings"]["INFERENCE_NUM_THREADS"] == 1 and ov["settings"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert "## OpenVINO CPU, test_vit" in md
    row = next(line for line in md.splitlines() if line.startswith("| test_vit | portable@0.63 |"))
    ratios = ov["ratios"]["portable@0.63"]
    assert row.endswith(f"| {ratios['b1']['ratio']:.3f} / {ratios['b8']['ratio']:.3f} |")


def test_openvino_column_without_openvino(report, monkeypatch, tmp_path: Path) -> None:
    result, _ = report
    monkeypatch.setitem(sys.modules, "openvino", None)
    paths = {r["artifact"]: Path(r["path"]) for r in result["models"][0]["rows"]}
    cfg = bench.BenchConfig(threads=1, openvino_runs=(2, 1))
    ov = bench.openvino_latency(paths, torch.randn(2, 3, 160, 160), (3, 160, 160), cfg)
    assert ov == {"status": "not installed", "install": "pip install 'prune-export[openvino]'"}
    copy = json.loads(json.dumps(result, default=str))
    copy["models"][0]["openvino"] = ov
    md = bench.markdown(copy)
    row = next(line for line in md.splitlines() if line.startswith("| test_vit | int8@0.63 |"))
    assert row.endswith("| not installed |")
    assert "Not measured: OpenVINO is not installed (pip install 'prune-export[openvino]')" in md


def test_profile_by_op_sums_kernel_time(tmp_path: Path) -> None:
    path = export_onnx(tiny_vit(), tmp_path / "m.onnx", (3, 32, 32))
    profile = bench.profile_by_op(path, threads=1, runs=2)
    assert profile and all(ms >= 0 for ms in profile.values())
    assert {"MatMul", "Gemm"} & set(profile)
    assert not list(tmp_path.glob("*profile*"))  # the trace file is cleaned up


def _timing(layer: str, width: int, us_per_mac: float):
    from exporter.bench.align import WidthTiming

    macs = 1000 * width
    ms = macs * us_per_mac / 1e3
    return WidthTiming(layer, width, macs, ms, macs / (ms * 1e3))


def test_align_recommendation_sees_a_real_alignment_gain() -> None:
    from exporter.bench.align import GPU_ALIGN, recommend

    rng = np.random.default_rng(0)
    # Widths that are multiples of 16 run 20% faster than the rest; 1% noise.
    timings = [_timing("mlp", w, (0.8 if w % 16 == 0 else 1.0) * (1 + 0.01 * rng.standard_normal())) for w in range(1856, 1953)]
    advice = recommend(timings)
    assert advice["cpu_align"] == 16
    assert advice["recommended_align"] == max(16, GPU_ALIGN)


def test_align_recommendation_ignores_noise() -> None:
    from exporter.bench.align import GPU_ALIGN, recommend

    rng = np.random.default_rng(1)
    timings = [_timing("attention", w, 1 + 0.05 * rng.standard_normal()) for w in range(40, 97)]
    advice = recommend(timings)
    assert advice["cpu_align"] == 1
    assert advice["recommended_align"] == GPU_ALIGN


def test_align_table_measures_and_writes(tmp_path: Path) -> None:
    from exporter.bench import align as align_table

    timings, settings = align_table.measure(runs=2, threads=1, mlp_widths=(64, 72), head_widths=(8, 9), progress=False)
    assert {(t.layer, t.width) for t in timings} == {("mlp", 64), ("mlp", 72), ("attention", 8), ("attention", 9)}
    assert all(t.median_ms > 0 and t.macs_per_us > 0 for t in timings)
    paths = align_table.write(timings, align_table.recommend(timings), settings, tmp_path)
    assert "Recommended default `--align`" in paths["md"].read_text()
    assert json.loads(paths["json"].read_text())["recommendation"]["recommended_align"] >= 1
    assert align_table.main(["--render", str(paths["json"]), "--out", str(tmp_path / "again")]) == 0
