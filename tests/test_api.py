"""The public Python API, on a tiny real timm model: the same pipeline as the CLI, the pruned model kept."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from typer.testing import CliRunner

import prune_export
from exporter.cli import app
from exporter.pruned_file import plan_of
from search.core.errors import OptionError, UnknownModelError

FAST = dict(method="magnitude", finetune_steps=0, search_images=16, heldout_images=8, latency_runs=0)


def test_prune_takes_a_module_in_memory_and_gives_back_the_pruned_model_plan_and_report(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    result = prune_export.prune(model, budget=0.6, output=tmp_path / "m.onnx", **FAST)
    assert isinstance(result, prune_export.PruneResult)
    assert result.report["macs"]["onnx_ratio"] <= 0.6 + 1e-6 and result.report["model"]["classifier"]
    assert result.plan.pruned_macs == result.report["macs"]["pruned"]
    assert not (tmp_path / "m.work").exists()  # as the command line: the work folder goes once the run succeeded
    x = np.random.default_rng(1).standard_normal((3, 3, 160, 160)).astype(np.float32)
    session = ort.InferenceSession(str(result.onnx), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert expected.shape == (3, 10)
    with torch.no_grad():
        assert np.abs(result.model(torch.from_numpy(x)).numpy() - expected).max() < 1e-4
    saved = prune_export.save(result, tmp_path / "again.pt")
    with torch.no_grad():
        assert torch.equal(prune_export.load_pruned(saved)(torch.from_numpy(x)), result.model(torch.from_numpy(x)))


def test_the_api_and_the_cli_give_the_same_plan_for_the_same_seed(tmp_path):
    api = prune_export.prune("test_vit", budget=0.6, output=tmp_path / "api.onnx", random_init=True, **FAST)
    out = tmp_path / "cli.onnx"
    result = CliRunner().invoke(app, ["test_vit", "--random-init", "--budget", "0.6", "--method", "magnitude",
                                      "--finetune-steps", "0", "--search-images", "16", "--heldout-images", "8",
                                      "--latency-runs", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    cli_blocks = json.loads(out.with_suffix(".json").read_text())["blocks"]
    assert api.report["blocks"] == cli_blocks
    assert plan_of(out.with_suffix(".pt")).blocks == api.plan.blocks  # the same kept indices, not only the same widths
    assert prune_export.load_model("test_vit", random_init=True, num_classes=3).num_classes == 3


def test_bad_calls_are_refused_with_the_fix(tmp_path):
    with pytest.raises(OptionError, match="unknown options"):
        prune_export.prune("test_vit", output=tmp_path / "m.onnx", serach_steps=3)
    with pytest.raises(OptionError, match="give one of them"):
        prune_export.prune("test_vit", budget=0.5, latency_budget=0.5, output=tmp_path / "m.onnx")
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(UnknownModelError):
        prune_export.prune(plain, output=tmp_path / "m.onnx")
    with pytest.raises(UnknownModelError):
        prune_export.load_model("not_a_model_name")
