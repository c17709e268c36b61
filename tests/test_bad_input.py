"""Bad input found by trying it, end to end through the CLI: one line, exit 2, no traceback, no file.

Each case once failed late (after the search, export or latency) with an internal error, or ran
while silently ignoring an option; each now fails before the work it would spoil, or, for random
weights under int8, passes on the figure that means something.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import exporter.report
from tests.test_cli import FAST, assert_clean_failure, image_folder, invoke


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("PRUNE_EXPORT_OFFLINE", "1")


REPORT_FILES = (".onnx", ".json", ".md", ".png")


def _boom(*_args, **_kwargs):
    raise RuntimeError("report writer failed")


@pytest.mark.parametrize("writer", ["markdown", "plot_widths"])
def test_a_failing_report_leaves_neither_onnx_nor_report(tmp_path, monkeypatch, writer):
    out = tmp_path / "m.onnx"
    monkeypatch.setattr(exporter.report, writer, _boom)
    result = invoke("test_vit", "--random-init", "-o", out, *FAST)
    assert result.exit_code == 1 and "report writer failed" in result.output
    assert not [out.with_suffix(s) for s in REPORT_FILES if out.with_suffix(s).exists()]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_failing_report_keeps_the_previous_run_whole(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    assert invoke("test_vit", "--random-init", "-o", out, *FAST).exit_code == 0
    before = {s: (out.with_suffix(s).stat().st_ino, out.with_suffix(s).read_bytes()) for s in REPORT_FILES}
    monkeypatch.setattr(exporter.report, "plot_widths", _boom)
    assert invoke("test_vit", "--random-init", "-o", out, *FAST).exit_code == 1
    after = {s: (out.with_suffix(s).stat().st_ino, out.with_suffix(s).read_bytes()) for s in REPORT_FILES}
    assert after == before  # the same files, untouched: no new ONNX beside the old report
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
