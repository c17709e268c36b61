"""The crossover bench end to end in its quick form, and its crossover arithmetic on made-up timings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.bench import crossover as bench

NAMES = {"softmax dense", "softmax 0.63", "linear dense", "linear 0.63"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crossover")
    assert bench.main(["--quick", "--out", str(out), "--work", str(out / "work")]) == 0
    return out


def test_quick_run_writes_every_file_and_every_parity_passed(quick: Path) -> None:
    report = json.loads((quick / "crossover.json").read_text())
    assert [s["px"] for s in report["sizes"]] == list(bench.QUICK.sizes)
    for size in report["sizes"]:
        rows = {r["model"]: r for r in size["rows"]}
        assert set(rows) == NAMES
        for name, row in rows.items():
            assert row["parity"]["passed"], (size["px"], name, row["parity"])
            assert row["ms"] > 0 and [len(s) for s in row["samples_ms"]] == [size["runs"]] * bench.QUICK.passes, name
            assert len(row["pass_ratios"]) == bench.QUICK.passes, name
            assert row["onnx_macs"] == row["analytic_macs"], (size["px"], name)
        assert rows["softmax dense"]["ratio"] == 1.0
        for attention in bench.ATTENTIONS:
            assert rows[f"{attention} 0.63"]["mac_ratio_to_own_dense"] <= 0.63
            assert rows[f"{attention} 0.63"]["analytic_macs"] < rows[f"{attention} dense"]["analytic_macs"]
    assert report["machine"]["cpus_usable"] >= 1 and report["command"].endswith("--quick")
    assert len(report["findings"]) == 4 and report["mac_crossover_px"] is not None
    md = (quick / "crossover.md").read_text()
    assert "## Where linear attention wins" in md and "| 96 | 37 | 2 × 2 | linear 0.63 |" in md
    assert report["findings"][0] in md and "FAILED" not in md
    assert (quick / "crossover.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (quick / "work" / "64").exists()  # ONNX files are removed unless --keep


def test_render_rewrites_the_report_without_timing(quick: Path, tmp_path: Path) -> None:
    assert bench.main(["--render", str(quick / "crossover.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "crossover.md").read_text() == (quick / "crossover.md").read_text()


def _sizes(ratios: dict[int, float]) -> list[dict]:
    """Made-up sizes where softmax dense takes 10 ms and linear dense ``ratio`` times that."""
    return [{"px": px, "rows": [{"model": "softmax dense", "ms": 10.0}, {"model": "linear dense", "ms": 10.0 * r}]}
            for px, r in ratios.items()]


@pytest.mark.parametrize(("ratios", "from_px", "estimate"), [
    ({224: 1.2, 448: 0.8, 672: 0.5}, 448, 224 + 224 * 0.4499),  # log-interpolated between the sizes
    ({224: 0.9, 448: 0.8}, 224, None),   # wins everywhere: no estimate below the smallest size
    ({224: 1.5, 448: 1.1}, None, None),  # never wins
    ({224: 0.9, 448: 1.1, 672: 0.7}, 672, 448 + 224 * 0.2109),  # wins for good only from 672 px
])
def test_crossover_is_read_from_the_measured_ratios(ratios, from_px, estimate) -> None:
    found = bench.crossover(_sizes(ratios), "linear dense", "softmax dense")
    assert found["from_px"] == from_px
    assert found["estimate_px"] == (None if estimate is None else pytest.approx(estimate, abs=1))
    sentence = bench._sentence(found, list(ratios), "Dense")
    assert ("does not win" in sentence) == (from_px is None)


def test_mac_crossover_matches_the_kinds_formulas() -> None:
    softmax, linear = (bench.describe(bench.build(a, 64, 0)) for a in bench.ATTENTIONS)
    px = bench.mac_crossover(softmax, linear)
    # DeiT-S, d = 64, 5×5 DWC: softmax mixes tokens for 2·N²·D MACs per block, linear for N·D·(2d+1) + 25·D·(N-1).
    def wins(px: int) -> bool:
        n = (px // 16) ** 2 + 1
        return n * (2 * 64 + 1) + 25 * (n - 1) < 2 * n * n
    assert wins(px) and not wins(px - 16)


def test_passes_that_disagree_are_named() -> None:
    sizes = [{"px": px, "rows": [{"model": "softmax dense", "ms": 10.0, "pass_ms": [10.0, 10.0, 10.0]},
                                 {"model": "linear dense", "ms": 10.0 * r, "pass_ms": [10.0 * p for p in passes]}]}
             for px, r, passes in ((224, 1.1, (1.1, 1.1, 1.2)), (448, 0.97, (0.95, 0.97, 1.04)), (672, 0.6, (0.6, 0.6, 0.6)))]
    found = bench.crossover(sizes, "linear dense", "softmax dense")
    assert found["from_px"] == 448 and found["passes_disagree_px"] == [448]
    sentence = bench._sentence(found, [224, 448, 672], "Dense")
    assert "disagreed on which is faster at 448 px" in sentence and "tie at 448 px" in sentence
