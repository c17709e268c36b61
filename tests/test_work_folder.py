"""What a successful run leaves: the four output files, no work folder unless --keep-work, and warnings that name a fix."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from exporter.input_checks import unused_pixels_warning
from exporter.stages.workdir import human_bytes, resumed_note
from search.core.errors import OptionError
from tests.test_cli import FAST, invoke


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("PRUNE_EXPORT_OFFLINE", "1")


def test_a_successful_run_removes_its_work_folder_and_says_how_large_it_was(tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--random-init", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    assert not out.with_suffix(".work").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.md", "m.onnx", "m.png", "m.pt"]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["work"]["kept"] is False and report["work"]["bytes"] > 100_000 and report["plan"]["path"] is None
    assert f"m.work removed ({human_bytes(report['work']['bytes'])})" in result.output and "--keep-work" in result.output
    assert "removed after the run" in out.with_suffix(".md").read_text()


def test_keep_work_keeps_it_and_a_rerun_resumes_from_it(tmp_path):
    out = tmp_path / "m.onnx"
    args = ("test_vit", "--random-init", "--method", "acp", "--search-steps", "2", "-o", out, "--keep-work", *FAST)
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    work = out.with_suffix(".work")
    assert (work / "plan.json").is_file() and "kept" in first.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["work"]["kept"] is True and report["plan"]["path"] == str(work / "plan.json")
    # a search stopped after its last checkpoint but before the plan was saved resumes from that checkpoint
    (work / "plan.json").unlink()
    (work / "plan.json.key").unlink()
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    state = next(work.glob("search-*.pt"))
    assert f"resumed from {state} at step 2 of 2" in again.output
    third = invoke(*args)
    assert "resumed the saved plan" in third.output


def test_resumed_note_reads_the_step_of_a_checkpoint(tmp_path):
    path = tmp_path / "search-x.pt"
    assert resumed_note(path, 40) is None
    torch.save({"step": 20, "gates": {}}, path)
    assert resumed_note(path, 40) == f"resumed from {path} at step 20 of 40"


def test_an_input_size_that_leaves_pixels_unused_is_named():
    strict = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=100)
    assert "last 4 pixel rows and columns are never seen; use 96 or 112" in unused_pixels_warning(strict, 100)
    assert unused_pixels_warning(timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=96), 96) is None
    lenient = timm.create_model("test_vit", pretrained=False, img_size=100)  # refuses the input at its first forward
    with pytest.raises(OptionError, match="use 96 or 112"):
        unused_pixels_warning(lenient, 100)


def test_the_warning_reaches_the_terminal_and_the_report(tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke("deit_t", "--random-init", "--img-size", "40", "-o", out, "--latency-runs", "1", "--calib-images", "2")
    assert result.exit_code == 0, result.output
    assert "--img-size 40 is not a multiple of the 16 px patch" in result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert any("--img-size 40" in w for w in report["warnings"])
    assert "> warning: --img-size 40" in out.with_suffix(".md").read_text()


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 2_700_000, 397_000_000, 1_500_000_000)] == ["512 B", "2.7 MB", "397 MB", "1.5 GB"]


def test_the_committed_sample_report_holds_no_machine_path():
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "artifacts" / "sample"
    for path in sample.glob("*.[jm][sd]*"):  # the .json and the .md
        text = path.read_text()
        assert not [p for p in ("/work/", "/home/", "/root/", "/tmp/", "/Users/") if p in text], path
