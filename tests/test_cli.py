"""The command line, end to end on timm's tiny test_vit: real weights files, real ONNX, real ORT."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

from exporter.cli import app
from exporter.onnx_macs import count_onnx_macs
from exporter.stages.effort import resolve_effort

FAST = ["--latency-runs", "2", "--calib-images", "4"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("PRUNE_EXPORT_OFFLINE", "1")


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_failure(result, out: Path, *needles: str, work_kept: bool = False) -> None:
    assert result.exit_code == 2, result.output
    assert out.with_suffix(".work").exists() == work_kept
    assert "Traceback" not in result.output
    assert "error:" in result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def image_folder(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_random_init_run_writes_a_valid_onnx_and_report(tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--random-init", "--budget", "0.63", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS" in result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"]["random_weights"] is True and "warning" in report
    assert report["macs"]["pruned"] <= 0.63 * report["macs"]["dense"]
    assert count_onnx_macs(out) <= 0.63 * report["macs"]["onnx_dense"]
    assert report["parity"]["max_abs_diff"] < 1e-4 and report["parity"]["top1_agreement"] == 1.0
    assert report["latency"][0]["provider"] == "CPUExecutionProvider" and report["latency"][0]["ratio"] > 0
    assert report["preprocessing"]["input_size"] == [3, 160, 160]
    assert {"cpu_count", "onnxruntime"} <= set(report["machine"])
    assert out.with_suffix(".png").stat().st_size > 1000 and out.with_suffix(".md").is_file()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        (y,) = session.run(None, {"input": np.random.rand(batch, 3, 160, 160).astype(np.float32)})
        assert y.shape == (batch, 1000)


def test_rerun_resumes_the_saved_plan_and_plan_replays(tmp_path):
    out = tmp_path / "m.onnx"
    assert invoke("test_vit", "--random-init", "-o", out, "--keep-work", *FAST).exit_code == 0
    again = invoke("test_vit", "--random-init", "-o", out, "--keep-work", *FAST)
    assert again.exit_code == 0 and "resumed" in again.output
    plan_path = out.with_suffix(".work") / "plan.json"
    replay_out = tmp_path / "replay.onnx"
    replay = invoke("test_vit", "--random-init", "--plan", plan_path, "-o", replay_out, *FAST)
    assert replay.exit_code == 0 and "replayed" in replay.output
    first, second = (json.loads(p.with_suffix(".json").read_text()) for p in (out, replay_out))
    assert first["blocks"] == second["blocks"] and first["macs"] == second["macs"]


def test_budget_one_exports_the_dense_model(tmp_path):
    out = tmp_path / "dense.onnx"
    result = invoke("test_vit", "--random-init", "--budget", "1.0", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["macs"]["ratio"] == 1.0 and report["macs"]["onnx_pruned"] == report["macs"]["onnx_dense"]
    assert report["plan"]["method"] == "dense"  # budget 1 removes nothing: no search, whatever the method


def test_checkpoint_and_data_are_used(tmp_path):
    torch.manual_seed(5)
    ckpt = tmp_path / "w.pth"
    torch.save({"model": timm.create_model("test_vit").state_dict()}, ckpt)
    data = image_folder(tmp_path / "imgs")
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--checkpoint", ckpt, "--data", data, "--finetune-steps", "2", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"]["weights"].startswith("checkpoint:") and report["model"]["random_weights"] is False
    assert "3 search + 3 held-out images from" in report["parity"]["inputs"]
    assert report["recovery"]["steps"] == 2 and len(report["recovery"]["history"]) == 2
    repair = report["compensation"]  # real weights: compensated before recovery, and still within parity after the fold
    assert len(repair["blocks"]) == 6 and all(b["after"] <= b["before"] for b in repair["blocks"])
    assert "compensation: closed-form refit of 6 blocks" in out.with_suffix(".md").read_text()
    assert report["parity"]["passed"]
    assert report["plan"]["method"] == "acp"  # the default with --data
    assert report["search"]["steps"] == resolve_effort("default", "cpu").search_steps


def test_failed_parity_writes_nothing_and_keeps_the_plan(tmp_path):
    out = tmp_path / "m.onnx"
    assert invoke("test_vit", "--random-init", "-o", out, "--keep-work", *FAST).exit_code == 0
    for suffix in (".onnx", ".json", ".md", ".png"):
        out.with_suffix(suffix).unlink()
    cached = out.with_suffix(".work") / "pruned.onnx"
    graph = onnx.load(str(cached))
    init = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(init)
    noise = np.random.default_rng(0).normal(0, 1, weights.shape).astype(weights.dtype)
    init.CopyFrom(numpy_helper.from_array(weights + noise, init.name))
    onnx.save(graph, str(cached))
    result = invoke("test_vit", "--random-init", "-o", out, *FAST)
    assert_clean_failure(result, out, "parity", work_kept=True)
    assert (out.with_suffix(".work") / "plan.json").is_file()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["deit_bb", "--random-init"], ["unknown model 'deit_bb'", "deit_b"]),
        (["test_vit", "--random-init", "--budget", "abc"], ["--budget", "'abc'"]),
        (["test_vit", "--random-init", "--budget", "0"], ["(0, 1]"]),
        (["test_vit", "--random-init", "--budget", "1.5"], ["(0, 1]"]),
        (["test_vit", "--random-init", "--budget", "0.01"], ["unreachable", "--budget"]),
        (["test_vit"], ["--checkpoint", "--random-init"]),
    ],
)
def test_bad_input_fails_cleanly(tmp_path, args, needles):
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke(*args, "-o", out, *FAST), out, *needles)


def test_missing_corrupt_and_mismatched_checkpoints(tmp_path):
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("test_vit", "--checkpoint", tmp_path / "none.pth", "-o", out), out, "does not exist")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage" * 100)
    assert_clean_failure(invoke("test_vit", "--checkpoint", corrupt, "-o", out), out, "corrupt")
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), other)
    assert_clean_failure(invoke("test_vit", "--checkpoint", other, "-o", out), out, "does not fit")


def test_missing_empty_and_corrupt_data(tmp_path):
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("test_vit", "--random-init", "--data", tmp_path / "nope", "-o", out), out, "does not exist")
    assert_clean_failure(invoke("test_vit", "--random-init", "--data", tmp_path / "nope.txt", "-o", out), out, "does not exist")
    (tmp_path / "file.png").write_bytes(b"x")
    assert_clean_failure(invoke("test_vit", "--random-init", "--data", tmp_path / "file.png", "-o", out), out, "not a directory")
    (tmp_path / "empty").mkdir()
    assert_clean_failure(invoke("test_vit", "--random-init", "--data", tmp_path / "empty", "-o", out), out, "no images")
    data = image_folder(tmp_path / "imgs")
    (data / "a" / "broken.png").write_bytes(b"not a png")
    assert_clean_failure(invoke("test_vit", "--random-init", "--data", data, "-o", out, "--calib-images", "7"), out, "broken.png")


def test_unwritable_output_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker / "m.onnx"
    result = invoke("test_vit", "--random-init", "-o", out)
    assert result.exit_code == 2 and "cannot write" in result.output and "Traceback" not in result.output
    assert_clean_failure(invoke("test_vit", "--random-init", "-o", tmp_path / "m.txt"), tmp_path / "m.txt", ".onnx")


def test_missing_and_foreign_plans(tmp_path):
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("test_vit", "--random-init", "--plan", tmp_path / "p.json", "-o", out), out, "does not exist")
    other = tmp_path / "other.onnx"
    assert invoke("test_vit", "--random-init", "--budget", "0.5", "-o", other, "--keep-work", *FAST).exit_code == 0
    plan = json.loads((other.with_suffix(".work") / "plan.json").read_text())
    plan["model"] = "deit_tiny_patch16_224"
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(plan))
    assert_clean_failure(invoke("test_vit", "--random-init", "--plan", foreign, "-o", out), out, "made for deit_tiny")


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    exe = Path(sys.executable).with_name("prune-export")
    proc = subprocess.run([str(exe), "deit_b", "--budget", "2", "-o", str(tmp_path / "m.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--budget" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, quantized",
    [(["--target", "ort"], False), (["--quantize", "int8"], True), (["--precision", "fp16"], True),
     (["--quantize", "int8", "--quantize-mode", "static"], True)],
)
def test_every_target_and_precision_passes_parity_and_runs(tmp_path, args, quantized):
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--random-init", *args, "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    artifact = json.loads(out.with_suffix(".json").read_text())["artifact"]
    assert artifact["parity"]["passed"] is True
    if quantized:
        assert artifact["parity"]["mean_cosine"] >= 0.99
    else:
        assert artifact["parity"]["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        assert session.run(None, {"input": np.random.rand(batch, 3, 160, 160).astype(np.float32)})[0].shape == (batch, 1000)


@pytest.mark.parametrize("args, needle", [(["--target", "tensorrt"], "--target"), (["--precision", "fp16", "--quantize", "int8"], "exclude")])
def test_bad_artifact_options_fail_cleanly(tmp_path, args, needle):
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("test_vit", "--random-init", *args, "-o", out), out, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu_fails_cleanly(tmp_path):
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("test_vit", "--random-init", "--device", "cuda", "-o", out), out, "no GPU", "--device auto")
