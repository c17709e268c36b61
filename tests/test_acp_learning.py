"""The acp search learns: tests that fail when the gates stay where they started.

Each planted case is set up so that a search which learned nothing (gates frozen at their initial
values) fails it: the attention-difference initialisation is off, so every gate starts equal and
only training can tell the channels apart. The tiny models are backbones (block outputs distilled):
a random classifier's near-flat logits give the gates almost no signal.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from search.methods.acp import AcpConfig, AcpResult, acp_search
from search.budget.allocate import SolverConfig, make_plan, round_widths, solve_widths
from search.core.errors import OptionError
from search.core.runtime import Runtime
from search.methods.gates import ChannelGates
from search.methods.importance import random_scores
from search.budget.macs import describe, model_macs
from tests.conftest import tiny_vit

CPU = Runtime(torch.device("cpu"))
HEADS, DIM, HEAD_DIM = 4, 64, 16
V0 = 2 * DIM  # first v row of qkv
IMPORTANT_V, IMPORTANT_MLP = 3, 10
ORIGINAL, DUPLICATE = 5, 7


def _model() -> torch.nn.Module:
    return tiny_vit(num_heads=HEADS, embed_dim=DIM, depth=2, num_classes=0)


def _planted() -> torch.nn.Module:
    """A tiny ViT whose block 0 has one dominant v channel (in every head) and one dominant MLP unit."""
    model = _model()
    with torch.no_grad():
        attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
        for h in range(HEADS):
            row = V0 + h * HEAD_DIM + IMPORTANT_V
            attn.qkv.weight[row] *= 6.0
            attn.proj.weight[:, h * HEAD_DIM + IMPORTANT_V] *= 6.0
        mlp.fc1.weight[IMPORTANT_MLP] *= 6.0
        mlp.fc2.weight[:, IMPORTANT_MLP] *= 6.0
    return model


def _images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def _search(model: torch.nn.Module, **overrides) -> AcpResult:
    config = AcpConfig(budget=0.5, steps=30, batch_size=8, lr=0.1, calib_images=8, attn_init=False, similarity=False, seed=1)
    return acp_search(model, describe(model), _images(), dataclasses.replace(config, **overrides), classifier=False, runtime=CPU)


@pytest.mark.parametrize("indicator", ["free", "shared"])
def test_the_gates_move_away_from_where_they_started(indicator):
    found = _search(_model(), indicator=indicator)
    for start, end in zip(found.initial, found.indicators):
        for group in ("qk", "v", "mlp"):
            moved = (getattr(end, group) - getattr(start, group)).abs()
            assert moved.mean() > 0.05, f"{group} gates barely moved ({moved.mean():.4f})"


@pytest.mark.parametrize("indicator", ["free", "shared"])
def test_the_expected_macs_reach_the_budget(indicator):
    found = _search(_model(), indicator=indicator)
    assert found.expected_ratio <= 0.5 + 0.03
    assert found.expected_ratio > 0.3  # met by pruning to the budget, not by closing everything


@pytest.mark.parametrize("indicator", ["free", "shared"])
def test_a_planted_important_channel_gets_the_highest_indicator_and_is_kept(indicator):
    model = _planted()
    found = _search(model, indicator=indicator)
    block = found.indicators[0]
    v = block.v.sum(0)
    others = torch.cat([v[:IMPORTANT_V], v[IMPORTANT_V + 1:]])
    assert v[IMPORTANT_V] > others.max(), "the dominant v channel is not the one the search trusts most"
    mlp_others = torch.cat([block.mlp[:IMPORTANT_MLP], block.mlp[IMPORTANT_MLP + 1:]])
    assert block.mlp[IMPORTANT_MLP] > mlp_others.quantile(0.9)
    geometry = describe(model)
    plan = make_plan(geometry, found.scores, SolverConfig(0.5, align=4, normalise=False), model="t", img_size=32, method="acp",
                     targets=found.widths)
    assert all(IMPORTANT_V in head for head in plan.blocks[0].v) and IMPORTANT_MLP in plan.blocks[0].mlp


def test_a_planted_duplicate_is_dropped_and_its_original_kept():
    model = _model()
    with torch.no_grad():
        attn = model.blocks[0].attn
        for h in range(HEADS):
            attn.qkv.weight[V0 + h * HEAD_DIM + DUPLICATE] = attn.qkv.weight[V0 + h * HEAD_DIM + ORIGINAL]
            attn.qkv.bias[V0 + h * HEAD_DIM + DUPLICATE] = attn.qkv.bias[V0 + h * HEAD_DIM + ORIGINAL]
            # the pair together writes what the original wrote alone: either one may go if the other takes its column
            attn.proj.weight[:, h * HEAD_DIM + ORIGINAL] *= 0.5
            attn.proj.weight[:, h * HEAD_DIM + DUPLICATE] = attn.proj.weight[:, h * HEAD_DIM + ORIGINAL]
    found = _search(model, similarity=True)
    v = found.scores[0].v.sum(0)
    lowest = set(v.argsort()[:2].tolist())
    assert lowest == {ORIGINAL, DUPLICATE}, f"the duplicated pair should rank last, got the lowest {sorted(lowest)}"
    geometry = describe(model)
    plan = make_plan(geometry, found.scores, SolverConfig(0.85, align=1, normalise=False), model="t", img_size=32, method="acp")
    kept = set(plan.blocks[0].v[0])
    assert len(kept) < HEAD_DIM, "the plan must cut block 0's v for this test to mean anything"
    assert not {ORIGINAL, DUPLICATE} <= kept


def test_the_shared_indicator_is_the_same_in_every_head():
    geometry = describe(_model())
    gates = ChannelGates(geometry, init=random_scores(geometry, 0), shared=True)
    values = gates.values(0)
    assert gates.qk[0].shape == (HEAD_DIM,)
    assert torch.equal(values.qk, values.qk[:1].expand_as(values.qk)) and torch.equal(values.v, values.v[:1].expand_as(values.v))
    found = _search(_model(), indicator="shared")
    for block in found.indicators:
        assert torch.equal(block.v, block.v[:1].expand_as(block.v))


def test_an_unknown_indicator_or_widths_names_the_choices():
    with pytest.raises(OptionError, match="free, shared"):
        AcpConfig(budget=0.5, indicator="per-head")
    with pytest.raises(OptionError, match="greedy, search"):
        AcpConfig(budget=0.5, widths="learned")


@pytest.mark.parametrize("budget", [0.35, 0.5, 0.63, 0.8])
def test_widths_from_the_search_meet_the_budget_and_stay_near_their_targets(budget):
    model = tiny_vit(num_heads=HEADS, embed_dim=DIM, depth=3)
    geometry = describe(model)
    config = SolverConfig(budget, align=4, normalise=False)
    targets = solve_widths(geometry, random_scores(geometry, 3), config)  # a feasible, aligned allocation
    got = round_widths(geometry, targets, config)
    assert model_macs(geometry, got) <= budget * model_macs(geometry)
    for t, w in zip(targets, got):
        for group in ("qk", "v", "mlp"):
            assert abs(getattr(w, group) - getattr(t, group)) <= 4 * (1 + (group == "mlp"))
    assert got != solve_widths(geometry, random_scores(geometry, 4), config)  # the targets, not the scores, set them


def test_widths_from_the_search_cut_dense_targets_down_to_the_budget():
    geometry = describe(tiny_vit(num_heads=HEADS, embed_dim=DIM, depth=3))
    config = SolverConfig(0.5, align=4)
    got = round_widths(geometry, geometry.dense_widths(), config)
    assert 0.45 * model_macs(geometry) < model_macs(geometry, got) <= 0.5 * model_macs(geometry)
    assert all(getattr(w, g) % 4 == 0 for w in got for g in ("qk", "v", "mlp"))


def test_widths_from_the_search_keep_to_the_heads_chosen_first():
    geometry = describe(tiny_vit(num_heads=HEADS, embed_dim=DIM, depth=3))
    heads = ((0, 1), (), (0, 1, 2, 3))
    config = SolverConfig(0.45, align=4)
    got = round_widths(geometry, geometry.dense_widths(), config, heads)
    assert [w.heads for w in got] == [2, 0, 4] and got[1].qk == got[1].v == 0
    assert model_macs(geometry, got) <= 0.45 * model_macs(geometry)
    plan = make_plan(geometry, random_scores(geometry, 0), config, model="t", img_size=32, method="dsp+acp", heads=heads, targets=got)
    assert plan.widths() == got
