"""OUT.pt: the pruned PyTorch model every run writes beside OUT.onnx, rebuilt without the search."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from exporter.cli import app, export_app
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


def test_export_writes_a_validated_onnx_of_a_pruned_model_fine_tuned_since(tmp_path):
    import timm

    torch.manual_seed(0)
    dense = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    checkpoint = tmp_path / "dense.pth"
    torch.save(dense.state_dict(), checkpoint)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["test_vit", "--checkpoint", str(checkpoint), "--budget", "0.6", "--method", "magnitude",
                                      "--finetune-steps", "0", "--search-images", "16", "--heldout-images", "8",
                                      "--latency-runs", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = load_pruned(out.with_suffix(".pt"))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # the user's own training, a few steps
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 160, 160)), torch.randint(0, 10, (4,)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    import prune_export

    tuned = prune_export.save(model, tmp_path / "tuned.pt", plan=plan_of(out.with_suffix(".pt")))
    # save() reads the architecture from the module: the dense source is not in it, so export needs the checkpoint
    exported = tmp_path / "tuned.onnx"
    refused = CliRunner().invoke(export_app, [str(tuned), "-o", str(exported), "--latency-runs", "0"])
    assert refused.exit_code != 0 and "pruned from" in refused.output and "Traceback" not in refused.output
    done = CliRunner().invoke(export_app, [str(out.with_suffix(".pt")), "-o", str(tmp_path / "again.onnx"), "--latency-runs", "0"])
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "again.work").exists()
    report = json.loads((tmp_path / "again.json").read_text())
    assert report["parity"]["max_abs_diff"] < 1e-4 and report["compensation"] is None and report["recovery"] is None
    x = np.random.default_rng(2).standard_normal((2, 3, 160, 160)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "again.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = load_pruned(out.with_suffix(".pt"))(torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {session.get_inputs()[0].name: x})[0] - reference).max() < 1e-4
