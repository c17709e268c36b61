"""Focused linear attention equals its formula, stays finite in low precision, and exports to ONNX.

The reference below is written from the formula, not from the module: φ over all heads' channels
at once, the N×N linear attention map normalised row by row, and the depthwise convolution as an
explicit sum of shifted patch grids, added to the patch tokens only.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

from exporter.onnx_export import export_onnx
from exporter.parity import check_parity
from search.core.errors import WeightsError
from search.models.flatten.attention import FocusedLinearAttention, focused_feature_map
from search.models.flatten.deit import check_pattern, default_pattern, flatten_vit

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at scale 0.5, so no term of the formula is negligible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _odd_attention(num_prefix_tokens: int) -> FocusedLinearAttention:
    """q/k and v widths that differ from each other and from dim / heads, on a non-square grid."""
    attn = FocusedLinearAttention(
        dim=24, num_heads=3, qk_dim=5, v_dim=7, grid_size=(3, 4), num_prefix_tokens=num_prefix_tokens
    )
    return _randomise(attn).eval()


def _reference(attn: FocusedLinearAttention, x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """The FLatten formula in float64, written independently of the module's code path."""
    s = {name: t.detach().double() for name, t in attn.state_dict().items()}
    x = x.double()
    b, n, _ = x.shape
    h, dq, dv = attn.num_heads, attn.qk_dim, attn.v_dim
    pre, (rows, cols) = attn.num_prefix_tokens, attn.grid_size

    qkv = x @ s["qkv.weight"].T + s["qkv.bias"]
    q, k, v = qkv[..., : h * dq], qkv[..., h * dq : 2 * h * dq], qkv[..., 2 * h * dq :]
    k = k + s["positional_encoding"]

    def phi(t: torch.Tensor) -> torch.Tensor:
        y = (torch.relu(t) + 1e-6) / torch.log1p(torch.exp(s["scale"]))
        return y**p * (y.norm(dim=-1, keepdim=True) / (y**p).norm(dim=-1, keepdim=True))

    q = phi(q).reshape(b, n, h, dq)
    k = phi(k).reshape(b, n, h, dq)
    v = v.reshape(b, n, h, dv)
    a = torch.einsum("bnhd,bmhd->bhnm", q, k)
    out = torch.einsum("bhnm,bmhe->bnhe", a, v) / n
    out = out / (a.mean(dim=-1).transpose(1, 2)[..., None] + 1e-6)

    r = attn.dwc.kernel_size[0] // 2
    grid = F.pad(v[:, pre:].reshape(b, rows, cols, h, dv), (0, 0, 0, 0, r, r, r, r))
    w = s["dwc.weight"][:, 0]
    dwc = s["dwc.bias"].expand(b, rows, cols, h, dv).clone()
    for i in range(2 * r + 1):
        for j in range(2 * r + 1):
            dwc = dwc + grid[:, i : i + rows, j : j + cols] * w[:, i, j]
    out = torch.cat([out[:, :pre], out[:, pre:] + dwc.reshape(b, rows * cols, h, dv)], dim=1)
    return out.reshape(b, n, h * dv) @ s["proj.weight"].T + s["proj.bias"]


@pytest.mark.parametrize("num_prefix_tokens", [0, 2])
def test_module_equals_reference_formula(num_prefix_tokens: int) -> None:
    attn = _odd_attention(num_prefix_tokens)
    x = torch.randn(2, attn.num_tokens, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = attn(x)
    assert got.shape == (2, attn.num_tokens, 24)
    assert got.isfinite().all()
    torch.testing.assert_close(got, _reference(attn, x).float(), atol=1e-5, rtol=1e-5)


def test_dense_widths_and_layout() -> None:
    attn = FocusedLinearAttention.dense(32, 2, (4, 4), 1)
    assert (attn.num_heads, attn.qk_dim, attn.v_dim, attn.head_dim) == (2, 16, 16, 16)
    assert attn.qkv.out_features == 2 * (16 + 16 + 16)
    assert attn.scale.shape == (1, 1, 32)
    assert attn.positional_encoding.shape == (1, 17, 32)
    assert isinstance(attn.reweight, torch.nn.Identity)


def test_feature_map_norms_span_all_heads() -> None:
    x = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(0)).abs() + 0.1
    scale = torch.zeros(1, 1, 8)
    before = focused_feature_map(x, scale, 3)
    changed = x.clone()
    changed[..., 0] += 1.0  # a q channel of head 0 (heads of 4 channels)
    after = focused_feature_map(changed, scale, 3)
    assert not torch.allclose(before[..., 4:], after[..., 4:]), "head 1's φ ignored head 0's channel"
    y = (F.relu(x) + 1e-6) / F.softplus(scale)
    torch.testing.assert_close(before.norm(dim=-1), y.norm(dim=-1))  # focusing keeps the norm
    literal = y.double() ** 3 * (y.double().norm(dim=-1, keepdim=True) / (y.double() ** 3).norm(dim=-1, keepdim=True))
    torch.testing.assert_close(before.double(), literal, atol=1e-6, rtol=1e-5)


def test_feature_map_is_finite_in_fp16_at_both_extremes() -> None:
    scale = torch.zeros(1, 1, 6, dtype=torch.float16)
    all_negative = -torch.ones(1, 1, 6, dtype=torch.float16)  # y ≈ 1e-6: y³ underflows to 0
    large = torch.full((1, 1, 6), 60.0, dtype=torch.float16).index_fill(-1, torch.tensor([0]), 80.0)
    for x in (all_negative, large):
        phi = focused_feature_map(x, scale, 3)
        assert phi.isfinite().all() and (phi > 0).any()


def test_every_parameter_gets_a_finite_gradient() -> None:
    attn = _odd_attention(num_prefix_tokens=1).train()
    attn(torch.randn(2, attn.num_tokens, 24)).square().mean().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


def test_dwc_is_one_kernel_shared_by_heads_and_skips_prefix_tokens() -> None:
    attn = _odd_attention(num_prefix_tokens=2)
    convs = [m for m in attn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [attn.dwc]
    assert attn.dwc.weight.shape == (7, 1, 5, 5) and attn.dwc.groups == 7
    x = torch.randn(1, attn.num_tokens, 24)
    with torch.no_grad():
        with_dwc = attn(x)
        attn.dwc.weight.zero_()
        attn.dwc.bias.zero_()
        without = attn(x)
    torch.testing.assert_close(with_dwc[:, :2], without[:, :2])  # prefix tokens: no DWC term
    assert (with_dwc[:, 2:] - without[:, 2:]).abs().amax(dim=-1).min() > 1e-4  # every patch has one


def test_wrong_token_count_and_masks_are_refused() -> None:
    attn = FocusedLinearAttention.dense(32, 2, (4, 4), 1)
    with pytest.raises(ValueError, match="17 tokens"):
        attn(torch.randn(1, 16, 32))
    with pytest.raises(NotImplementedError):
        attn(torch.randn(1, 17, 32), attn_mask=torch.zeros(17, 17))


@pytest.mark.parametrize(
    ("dtype", "autocast"), [(torch.bfloat16, True), (torch.float16, True), (torch.float16, False)]
)
def test_low_precision_stays_finite_and_close(dtype: torch.dtype, autocast: bool) -> None:
    attn = _odd_attention(num_prefix_tokens=1)
    # Scale 3 inputs through scale-0.5 weights: some tokens have a whole head of φ(q) underflow in fp16.
    x = 3.0 * torch.randn(2, attn.num_tokens, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = attn(x)
        if autocast:
            with torch.autocast("cpu", dtype=dtype):
                got = attn(x)
        else:
            got = attn.to(dtype)(x.to(dtype))
    assert got.dtype == dtype and got.isfinite().all()
    assert F.cosine_similarity(got.float().flatten(1), want.flatten(1)).min() > 0.99


def test_tiny_model_under_bf16_autocast_has_no_nan() -> None:
    torch.manual_seed(0)
    model = flatten_vit("deit_tiny_patch16_224", "LL", **TINY).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and out.isfinite().all()


def test_pattern_picks_the_attention_of_each_block() -> None:
    for pattern, kinds in (("LS", [FocusedLinearAttention, Attention]), ("SL", [Attention, FocusedLinearAttention])):
        model = flatten_vit("deit_tiny_patch16_224", pattern, **TINY)
        assert [type(b.attn) for b in model.blocks] == kinds
    attn = flatten_vit("deit_tiny_patch16_224", "LS", **TINY).blocks[0].attn
    assert (attn.grid_size, attn.num_prefix_tokens, attn.positional_encoding.shape) == ((4, 4), 1, (1, 17, 32))
    assert default_pattern(12) == "LLLLLLSSSSSS" and default_pattern(3) == "LLS"


@pytest.mark.parametrize("pattern", ["LSS", "L", "LX", "ls"])
def test_bad_pattern_names_length_and_alphabet(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"must be 2 characters .*'L'.*'S'"):
        flatten_vit("deit_tiny_patch16_224", pattern, **TINY)
    with pytest.raises(ValueError, match="12 characters"):
        check_pattern(pattern, 12)


def test_dynamic_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match="dynamic_img_size"):
        flatten_vit("deit_tiny_patch16_224", "LS", dynamic_img_size=True, **TINY)


def test_registered_model_runs_and_state_dict_round_trips() -> None:
    torch.manual_seed(0)
    model = timm.create_model("flatten_deit_t", pretrained=False, pattern="LS", **TINY).eval()
    _randomise(model.blocks[0].attn)
    torch.manual_seed(1)
    fresh = timm.create_model("flatten_deit_t", pretrained=False, pattern="LS", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert not torch.allclose(fresh(x), before)
        fresh.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(fresh(x), before, atol=0, rtol=0)
    assert before.shape == (2, 10) and before.isfinite().all()


def test_flatten_deit_t_at_full_size_runs() -> None:
    model = timm.create_model("flatten_deit_t", pretrained=False).eval()
    assert model.blocks[0].attn.positional_encoding.shape == (1, 197, 192)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and out.isfinite().all()


@pytest.mark.parametrize(
    ("name", "base", "dim", "heads"),
    [
        ("flatten_deit_t", "deit_tiny_patch16_224", 192, 3),
        ("flatten_deit_s", "deit_small_patch16_224", 384, 6),
        ("flatten_deit_b", "deit_base_patch16_224", 768, 12),
    ],
)
def test_registered_geometry_and_preprocessing_are_deits(name: str, base: str, dim: int, heads: int) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    kinds = "".join("L" if isinstance(b.attn, FocusedLinearAttention) else "S" for b in model.blocks)
    assert kinds == "LLLLLLSSSSSS"
    attn = model.blocks[0].attn
    assert (model.embed_dim, attn.num_heads, attn.qk_dim, attn.v_dim) == (dim, heads, dim // heads, dim // heads)
    assert model.pretrained_cfg["architecture"] == name
    assert not any(model.pretrained_cfg.get(k) for k in ("url", "hf_hub_id", "file"))
    want = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(base).to_dict())
    assert timm.data.resolve_data_config({}, model=model) == want
    assert name in timm.list_models("flatten_deit_*") and name not in timm.list_models(pretrained=True)


def test_pretrained_weights_are_refused_clearly() -> None:
    with pytest.raises(WeightsError, match="no public pretrained weights"):
        timm.create_model("flatten_deit_s", pretrained=True)


@pytest.mark.parametrize("variant", [dict(), dict(reg_tokens=2, pattern="SL")])
def test_onnx_export_matches_pytorch_in_onnx_runtime(tmp_path: Path, variant: dict) -> None:
    args = dict(TINY, pattern="LS")
    args.update(variant)
    torch.manual_seed(0)
    model = flatten_vit("deit_tiny_patch16_224", **args).eval()
    for block in model.blocks:
        if isinstance(block.attn, FocusedLinearAttention):
            _randomise(block.attn)
    path = export_onnx(model, tmp_path / "flatten.onnx", (3, 32, 32))
    inputs = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    result = check_parity(path, model, inputs, classifier=True)
    assert result.passed and result.top1_agreement == 1.0
