"""Reweights fold exactly into proj and fc2."""
from __future__ import annotations

import copy

import pytest
import torch

from exporter.reweight import HeadReweight, UnitScale, add_reweights, fold_reweights
from exporter.surgery import apply_plan
from search.budget.allocate import SolverConfig, make_plan
from search.methods.importance import random_scores
from search.budget.macs import describe


def _pruned(model):
    geometry = describe(model)
    plan = make_plan(geometry, random_scores(geometry, 0), SolverConfig(0.6, align=4), model="t", img_size=32, method="random")
    return apply_plan(model, plan)


def test_identity_reweights_change_nothing(tiny_model):
    pruned = _pruned(tiny_model)
    x = torch.randn(2, 3, *tiny_model.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(add_reweights(copy.deepcopy(pruned))(x), pruned(x), atol=1e-6, rtol=0)


def test_trained_reweights_fold_exactly(tiny_model):
    model = add_reweights(_pruned(tiny_model))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (HeadReweight, UnitScale)):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
    x = torch.randn(3, 3, *tiny_model.patch_embed.img_size)
    with torch.no_grad():
        before = model(x)
        folded = fold_reweights(copy.deepcopy(model))
        after = folded(x)
    assert not any(isinstance(m, (HeadReweight, UnitScale)) for m in folded.modules())
    assert (before - _pruned(tiny_model)(x)).abs().max() > 1e-2
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_relation_agreement_is_one_for_the_same_geometry_and_low_for_noise():
    from exporter.fidelity import relation_agreement

    torch.manual_seed(0)
    feats = torch.randn(40, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    assert relation_agreement(3.0 * feats @ rotation, feats) == pytest.approx(1.0, abs=1e-9)
    assert abs(relation_agreement(torch.randn(40, 16), feats)) < 0.2
