"""Every bench that re-renders its committed report from its JSON gives back the committed report.

A bench's Markdown (and JSON) is what the README quotes; re-rendering it with unchanged inputs must
change nothing, or a renderer change has silently rewritten a measured figure. Each bench renders
into a temporary folder from the committed JSON, and the files are compared with the committed ones.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "artifacts" / "bench"

CASES = {
    "ablation": (["--render"], ["ablation.md", "ablation.json"]),
    "align": (["--render", str(BENCH / "align.json")], ["align.md", "align.json"]),
    "crossover": (["--render", str(BENCH / "crossover.json")], ["crossover.md"]),
    "latency": (["--render", str(BENCH / "latency.json")], ["latency.md"]),
}


@pytest.mark.parametrize("bench", sorted(CASES))
def test_re_rendering_a_committed_report_changes_nothing(bench: str, tmp_path: Path) -> None:
    args, files = CASES[bench]
    if bench == "ablation":  # it re-renders from the ablation.json in its --out folder
        (tmp_path / "ablation.json").write_bytes((BENCH / "ablation.json").read_bytes())
    main = importlib.import_module(f"exporter.bench.{bench}").main
    assert main([*args, "--out", str(tmp_path)]) == 0
    for name in files:
        assert (tmp_path / name).read_text() == (BENCH / name).read_text(), f"{bench} --render changed {name}"
