"""Device placement: every stage computes on the runtime's device and hands models back on the CPU.

On a CPU-only machine these run on the CPU and check the contract (what comes back is on the CPU,
whatever the stage did); with a GPU (``make gpu-check``) the same tests run on CUDA as well.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch

from exporter.recovery import HeldOut, RecoveryConfig, recover
from exporter.reweight import add_reweights, fold_reweights
from exporter.surgery import apply_plan
from search.methods.acp import AcpConfig, acp_search
from search.budget.allocate import SolverConfig, make_plan
from search.budget.macs import describe
from search.core.runtime import Runtime, on_device
from tests.conftest import tiny_vit
from tests.test_cli import FAST, invoke

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _devices_of(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def _all_cpu(scores) -> bool:
    return all(t.device.type == "cpu" for s in scores for t in (s.qk, s.v, s.mlp))


@pytest.mark.parametrize("device", DEVICES)
def test_on_device_hands_modules_back_on_the_cpu_even_after_a_failure(device):
    model = tiny_vit()
    rt = Runtime(torch.device(device))
    with pytest.raises(RuntimeError, match="boom"):
        with on_device(rt, model):
            assert _devices_of(model) == {device}
            raise RuntimeError("boom")
    assert _devices_of(model) == {"cpu"}


@pytest.mark.parametrize("device", DEVICES)
def test_acp_then_recovery_run_on_the_device_and_return_cpu_results(device):
    model = tiny_vit(num_heads=4, embed_dim=64, num_classes=0)
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    geometry = describe(model)
    rt = Runtime(torch.device(device))
    scores = acp_search(model, geometry, images, AcpConfig(budget=0.6, steps=3, batch_size=8, calib_images=4), False, rt).scores
    assert _all_cpu(scores) and _devices_of(model) == {"cpu"}
    plan = make_plan(geometry, scores, SolverConfig(0.6, align=4, normalise=False), model="tiny", img_size=32, method="acp")
    pruned = apply_plan(model, plan)
    add_reweights(pruned)
    result = recover(pruned, model, images, HeldOut(images[:8], None), RecoveryConfig(steps=2, eval_every=1), False, rt)
    fold_reweights(pruned)
    assert _devices_of(pruned) == {"cpu"} and _devices_of(model) == {"cpu"}
    assert len(result.history) == 3
    with torch.no_grad():
        assert torch.isfinite(pruned(images[:2])).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("finetune", ["0", "2"])
def test_cli_real_weights_run_on_the_device_exports_and_passes_parity(tmp_path, device, finetune):
    """The path the issue found broken on CUDA: acp search, then recovery or none, then k-NN, export, parity."""
    torch.manual_seed(2)
    ckpt = tmp_path / "w.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), ckpt)
    out = tmp_path / "m.onnx"
    result = invoke("test_vit", "--checkpoint", ckpt, "--device", device, "--search-steps", "2", "--finetune-steps", finetune,
                    "--search-images", "16", "--heldout-images", "8", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["search"]["device"].startswith(device)
    assert report["parity"]["passed"]
