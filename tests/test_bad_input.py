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


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--seed", "-1"], ["--seed", "-1", "from 0"]),
        (["--device", "cuda:abc"], ["--device", "cuda:N", "'cuda:abc'"]),
        (["--device", "gpu"], ["--device", "'gpu'"]),
        (["--indicator", "per-head"], ["--indicator", "'per-head'", "free, shared"]),
        (["--widths", "learned"], ["--widths", "'learned'", "greedy, search"]),
        (["--gate-optimiser", "sgd"], ["--gate-optimiser", "'sgd'", "adam, shared-scale"]),
        (["--method", "magnitude", "--widths", "search"], ["--widths", "--method acp or dsp+acp", "not --method magnitude"]),
    ],
)
def test_bad_seed_device_and_acp_options_fail_before_any_work(tmp_path, args, needles):
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("test_vit", "--random-init", *args, "-o", out, *FAST), out, *needles)


def test_a_file_in_place_of_the_work_folder_fails_before_any_work(tmp_path):
    out = tmp_path / "m.onnx"
    blocker = out.with_suffix(".work")
    blocker.write_text("not a folder")
    result = invoke("test_vit", "--random-init", "-o", out, *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.output and "internal error" not in result.output
    assert str(blocker) in result.output and "move or delete it" in result.output
    assert blocker.read_text() == "not a folder" and not out.exists()


def test_random_weights_under_int8_and_fp16_are_judged_by_cosine(tmp_path):
    # deit_t with random weights at 64 px: int8 keeps the cosine at 0.9996 but flips 2 of 16 top-1
    # classes of its near-flat logits, which the top-1 gate (0.9) used to refuse.
    for args in (["--quantize", "int8"], ["--precision", "fp16"]):
        out = tmp_path / f"{args[1]}.onnx"
        result = invoke("deit_t", "--random-init", "--img-size", "64", *args, "-o", out, "--latency-runs", "1")
        assert result.exit_code == 0, result.output
        assert "not judged: random weights" in result.output
        parity = json.loads(out.with_suffix(".json").read_text())["artifact"]["parity"]
        assert parity["passed"] and parity["top1_judged"] is False and parity["min_top1_agreement"] is None
        assert parity["mean_cosine"] >= 0.99 and "cosine only" in parity["note"]
        assert "not judged" in out.with_suffix(".md").read_text()
        if args[1] == "int8":
            assert parity["top1_agreement"] < 0.9  # the case that failed: it must stay a passing run


@pytest.fixture(scope="module")
def plan_half(tmp_path_factory) -> Path:
    """A plan searched at budget 0.5 (magnitude, align 8) on test_vit."""
    out = tmp_path_factory.mktemp("plan") / "half.onnx"
    assert invoke("test_vit", "--random-init", "--budget", "0.5", "-o", out, "--keep-work", *FAST).exit_code == 0
    return out.with_suffix(".work") / "plan.json"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--budget", "0.63"], ["--budget 0.63 was given", "made with --budget 0.5"]),
        (["--align", "4"], ["--align 4 was given"]),
        (["--method", "random"], ["--method random was given", "--method magnitude"]),
    ],
)
def test_plan_refuses_a_different_budget_align_or_method(tmp_path, plan_half, args, needles):
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("test_vit", "--random-init", "--plan", plan_half, *args, "-o", out), out, "--plan fixes", *needles)


def test_plan_replays_with_matching_values(tmp_path, plan_half):
    out = tmp_path / "m.onnx"
    args = ["--budget", "0.50", "--align", "8", "--method", "magnitude"]
    result = invoke("test_vit", "--random-init", "--plan", plan_half, *args, "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "budget 0.5, align 8" in result.output  # the console shows what the plan fixes
    assert json.loads(out.with_suffix(".json").read_text())["plan"]["budget"] == 0.5


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


def test_three_images_fail_when_loaded_with_the_count_and_the_minimum(tmp_path):
    data = tmp_path / "imgs"
    image_folder(data, per_class=2)
    (data / "b" / "1.png").unlink()  # 3 images in 2 classes
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--random-init", "--data", data, "-o", out, *FAST)
    assert_clean_failure(result, out, "holds 3 images", "at least 4", "add images")
    assert "✓ plan" not in result.output  # refused before the search


def test_an_error_text_with_brackets_prints_as_is(tmp_path):
    # rich markup in an error's text ("[/...]", as gloo's messages have) used to crash the printer
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("test_vit", "--random-init", "--device", "[/x]", "-o", out), out, "got '[/x]'")
