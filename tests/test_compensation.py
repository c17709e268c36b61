"""Compensation after the cut: the ridge fit, the logit fit, and the block-by-block repair on tiny real ViTs."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Attention

from exporter.compensation import CompensationConfig, compensate
from exporter.surgery import apply_plan
from search.attention import get_kind
from search.budget.allocate import SolverConfig, make_plan
from search.budget.macs import describe
from search.core.runtime import runtime
from search.cut.blocks import BlockPlan
from search.cut.least_squares import NormalEquations, load_fit, prior_of, ridge_solve
from search.methods.importance import random_scores
from tests.conftest import tiny_vit


def test_the_fit_recovers_a_layer_exactly_when_the_removed_inputs_are_linear_in_the_kept_ones():
    torch.manual_seed(0)
    kept = torch.randn(2000, 6)
    mixing = torch.randn(6, 3)
    full = torch.cat([kept, kept @ mixing + 0.5], dim=1)  # removed inputs: an affine map of the kept ones
    layer = torch.nn.Linear(9, 4)
    target = layer(full).detach()
    cut = torch.nn.Linear(6, 4)
    with torch.no_grad():
        cut.weight.copy_(layer.weight[:, :6])
        cut.bias.copy_(layer.bias)
    assert (cut(kept) - target).abs().max() > 0.1  # the cut alone is wrong
    eq = NormalEquations(6, 4)
    for z, t in zip(kept.split(300), target.split(300)):  # accumulated batch by batch
        eq.add(z, t)
    load_fit(cut, ridge_solve(eq, prior_of(cut), ridge=1e-10))
    assert torch.allclose(cut(kept), target, atol=1e-3)
    assert torch.allclose(cut.weight, layer.weight[:, :6] + layer.weight[:, 6:] @ mixing.T, atol=1e-3)


def test_a_large_ridge_keeps_the_cut_and_no_bias_stays_no_bias():
    torch.manual_seed(1)
    z, t = torch.randn(500, 5), torch.randn(500, 3)
    eq = NormalEquations(5, 3)
    eq.add(z, t)
    layer = torch.nn.Linear(5, 3, bias=False)
    fitted = ridge_solve(eq, prior_of(layer), ridge=1e9, bias=False)
    assert torch.allclose(fitted[:, :-1].float(), layer.weight.detach(), atol=1e-6)
    assert torch.count_nonzero(fitted[:, -1]) == 0
    with pytest.raises(ValueError, match="no calibration samples"):
        ridge_solve(NormalEquations(5, 3), prior_of(layer), 0.1)


@torch.no_grad()
def test_the_logit_fit_reproduces_the_dense_scores_when_the_removed_keys_are_linear_in_the_kept_ones():
    torch.manual_seed(2)
    attn = Attention(16, num_heads=2, qkv_bias=True).eval()
    h, d, dim = 2, 8, 16
    kept = (0, 2, 4, 6, 7)
    removed = [c for c in range(d) if c not in kept]
    w, b = attn.qkv.weight, attn.qkv.bias
    for head in range(h):  # k's removed channels are combinations of its kept channels
        rows = slice(h * d + head * d, h * d + (head + 1) * d)
        kw, kb = w[rows], b[rows]
        mix = torch.randn(len(removed), len(kept))
        kw[removed] = mix @ kw[list(kept)]
        kb[removed] = mix @ kb[list(kept)] + 0.3  # an intercept too: softmax does not see it
    plan = BlockPlan(heads=(0, 1), qk=(kept, kept), v=(tuple(range(d)),) * 2, mlp=())
    kind = get_kind("softmax")
    pruned = kind.slice(attn, plan)
    x = torch.randn(8, 10, dim)

    def scores(module, width):
        q, k, _ = module.qkv(x).split([h * width, h * width, module.qkv.out_features - 2 * h * width], dim=-1)
        q, k = q.reshape(8, 10, h, width).transpose(1, 2), k.reshape(8, 10, h, width).transpose(1, 2)
        s = q @ k.transpose(-1, -2)
        return s - s.mean(-1, keepdim=True)  # softmax reads scores up to a constant per query

    dense_scores = scores(attn, d)
    assert (scores(pruned, len(kept)) - dense_scores).abs().max() > 0.1
    assert kind.fit_logits(attn, pruned, plan, x, x, ridge=1e-10)
    assert torch.allclose(scores(pruned, len(kept)), dense_scores, atol=2e-3)
    assert torch.allclose(pruned(x), attn(x), atol=2e-4)  # v and proj are whole here: the output is the dense one


def _cut(model, budget=0.5):
    geometry = describe(model)
    plan = make_plan(geometry, random_scores(geometry, seed=3), SolverConfig(budget, align=4), model="tiny", img_size=32, method="random")
    return plan, apply_plan(model, plan, geometry)


def _relative_error(a, b):
    return float((a - b).pow(2).sum() / b.pow(2).sum())


@pytest.mark.parametrize("variant", [dict(), dict(init_values=0.5, reg_tokens=2, num_classes=0), dict(depth=3, num_heads=4, embed_dim=64)])
def test_compensation_never_makes_a_block_worse_and_brings_the_model_closer_to_dense(variant):
    dense = tiny_vit(**variant)
    plan, pruned = _cut(dense)
    cut = copy.deepcopy(pruned)
    torch.manual_seed(4)
    images = torch.randn(48, 3, 32, 32)
    with runtime("cpu") as rt:
        result = compensate(dense, pruned, plan, images, CompensationConfig(batch=16), rt)
    assert len(result.blocks) == len(plan.blocks) and result.images == 48
    for block in result.blocks:
        assert block.after <= block.before
        assert block.target == "stream" and "fc2" in block.fitted and "proj" in block.fitted and "logits" in block.fitted
    with torch.no_grad():
        reference = dense.forward_features(images)
        before = _relative_error(cut.forward_features(images), reference)
        after = _relative_error(pruned.forward_features(images), reference)
    assert after < 0.7 * before
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in cut.parameters()]  # same shape: the same graph


def test_a_post_norm_block_fits_each_layers_own_output_and_says_so():
    from timm.models.vision_transformer import ResPostBlock

    dense = tiny_vit(block_fn=ResPostBlock)
    plan, pruned = _cut(dense)
    with runtime("cpu") as rt:
        result = compensate(dense, pruned, plan, torch.randn(32, 3, 32, 32), CompensationConfig(), rt)
    assert {b.target for b in result.blocks} == {"own output"}
    assert any("own dense output" in note for note in result.notes)
    assert all(b.after <= b.before for b in result.blocks)
