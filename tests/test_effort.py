"""--effort: sized per device, overridden option by option, recorded; budget 1 is an export."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from exporter.cli import app
from exporter.stages.config import RunConfig, resolve_defaults
from exporter.stages.effort import EFFORTS, resolve_effort
from search.core.runtime import resolve_device


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_levels_grow_with_effort_on_each_device():
    for device in ("cpu", "cuda"):
        levels = [resolve_effort(name, device) for name in EFFORTS]
        for smaller, larger in zip(levels, levels[1:]):
            assert larger.search_steps > smaller.search_steps
            assert larger.finetune_steps >= smaller.finetune_steps
            assert larger.search_images >= smaller.search_images
        assert levels[-1].finetune_steps > levels[0].finetune_steps


def test_a_gpu_gets_larger_batches_and_longer_runs_than_the_cpu():
    cpu, gpu = resolve_effort("default", "cpu"), resolve_effort("default", "cuda")
    assert gpu.batch_size > cpu.batch_size and gpu.batch_size >= 64
    assert gpu.finetune_steps > cpu.finetune_steps and gpu.search_steps > cpu.search_steps
    assert gpu.device == "cuda" and cpu.device == "cpu"
    assert resolve_effort("default", "mps").device == "cpu"  # anything else is sized as a CPU


def test_auto_device_resolves_the_gpu_effort_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the device query, and nothing else, is mocked
    device = resolve_device("auto")
    assert device.type == "cuda"
    cfg = resolve_defaults(RunConfig("m", 0.63, "m.onnx"), random_weights=False, device_type=device.type)
    gpu = resolve_effort("default", "cuda")
    assert (cfg.search_steps, cfg.finetune_steps, cfg.search_images, cfg.batch_size) == \
        (gpu.search_steps, gpu.finetune_steps, gpu.search_images, gpu.batch_size)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


def test_explicit_options_override_the_effort_one_by_one():
    cfg = RunConfig("m", 0.63, "m.onnx", effort="best", search_steps=3, batch_size=4)
    effort = cfg.effort_for("cuda")
    best = resolve_effort("best", "cuda")
    assert (effort.search_steps, effort.batch_size) == (3, 4)
    assert (effort.finetune_steps, effort.search_images) == (best.finetune_steps, best.search_images)
    assert effort.overridden == ("--search-steps 3", "--batch-size 4")
    resolved = resolve_defaults(cfg, random_weights=False, device_type="cuda")
    assert resolved.acp_config().steps == 3 and resolved.acp_config().batch_size == 4
    assert resolved.dsp_config().batch_size == 4
    assert resolve_defaults(cfg, random_weights=True, device_type="cuda").finetune_steps == 0
    assert resolve_defaults(RunConfig("m", 0.63, "m.onnx", finetune_steps=7), True, "cpu").finetune_steps == 7


def test_an_unknown_effort_is_one_line_and_exit_2(tmp_path):
    result = invoke("test_vit", "--random-init", "--effort", "max", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert "fast, default, best" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_the_run_prints_and_records_its_effort(tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--random-init", "--effort", "best", "--search-steps", "2", "--method", "acp",
                    "--latency-runs", "0", "-o", out)
    assert result.exit_code == 0, result.output
    assert "effort best on cpu" in result.output and "given: --search-steps 2" in result.output
    effort = json.loads(out.with_suffix(".json").read_text())["effort"]
    best = resolve_effort("best", "cpu")
    assert effort["name"] == "best" and effort["search_steps"] == 2 and effort["batch_size"] == best.batch_size
    assert best.finetune_steps > 0 and effort["finetune_steps"] == 0 and "random weights" in effort["reason"]
    assert "effort: best" in out.with_suffix(".md").read_text()


def test_fast_and_default_on_the_cpu_are_compensation_alone():
    for name in ("fast", "default"):
        level = resolve_effort(name, "cpu")
        assert level.finetune_steps == 0 and "compensation" in level.reason
    assert resolve_defaults(RunConfig("m", 0.63, "m.onnx", effort="fast"), False, "cpu").compensate


def test_budget_1_searches_nothing_and_matches_the_dense_model(tmp_path):
    import timm

    reference = timm.create_model("test_vit", pretrained=False).eval()
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    out = tmp_path / "dense.onnx"
    result = invoke("test_vit", "--checkpoint", tmp_path / "weights.pth", "--budget", "1", "--method", "acp",
                    "--finetune-steps", "5", "--latency-runs", "0", "-o", out)
    assert result.exit_code == 0, result.output
    assert "no search and no recovery" in result.output
    assert "removes nothing: no search" in result.output and "the plan removes nothing: no recovery" in result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["recovery"] is None and report["plan"]["method"] == "dense" and report["macs"]["onnx_ratio"] == 1.0
    assert report["effort"]["search_steps"] == 0 and report["effort"]["finetune_steps"] == 0
    assert not list(tmp_path.glob("dense.work/search-*")) and not list(tmp_path.glob("dense.work/recovery-*"))
    x = np.random.default_rng(0).standard_normal((2, 3, 160, 160)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert report["fidelity"]["top1_agreement"] == 1.0 and report["fidelity"]["mean_kl"] == pytest.approx(0.0, abs=1e-9)
