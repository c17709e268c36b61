"""OUT.pt: the pruned PyTorch model every run writes beside OUT.onnx, rebuilt without the search."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from exporter.cli import app
from exporter.pruned_file import load_pruned, plan_of
from search.budget.plan import Plan
from search.core.errors import WeightsError


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "m.onnx"
    result = CliRunner().invoke(app, ["test_vit", "--random-init", "--budget", "0.6", "--method", "magnitude",
                                      "--latency-runs", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_every_run_writes_the_pruned_model_and_it_rebuilds_to_the_onnx_outputs(written):
    pt = written.with_suffix(".pt")
    assert pt.is_file()
    model = load_pruned(pt)
    x = np.random.default_rng(0).standard_normal((3, 3, 160, 160)).astype(np.float32)
    session = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x)).numpy()
    assert onnx_out.shape == torch_out.shape and np.abs(onnx_out - torch_out).max() < 1e-4
    report = json.loads(written.with_suffix(".json").read_text())
    assert plan_of(pt).pruned_macs == report["macs"]["pruned"]
    assert isinstance(plan_of(pt), Plan)


def test_a_missing_corrupt_or_foreign_file_is_refused_with_the_fix(tmp_path, written):
    with pytest.raises(WeightsError, match="does not exist"):
        load_pruned(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="corrupt"):
        load_pruned(tmp_path / "bad.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(WeightsError, match="--checkpoint"):
        load_pruned(tmp_path / "plain.pt")
