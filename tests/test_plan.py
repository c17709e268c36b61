"""The Plan: JSON round trip, and the invariants it refuses to break."""
from __future__ import annotations

import dataclasses
import json

import pytest

from search.allocate import SolverConfig, make_plan
from search.core.errors import PlanError
from search.importance import random_scores
from search.macs import describe
from search.plan import BlockPlan, Plan
from tests.conftest import tiny_vit


@pytest.fixture
def geometry():
    return describe(tiny_vit(num_heads=4, embed_dim=64))


@pytest.fixture
def plan(geometry):
    return make_plan(geometry, random_scores(geometry, 1), SolverConfig(0.6, align=4, per_head_indices=True), model="tiny", img_size=32, method="random")


def test_json_round_trip_is_exact(plan, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    again = Plan.load(path)
    assert again == plan
    assert json.loads(path.read_text())["format"] == "prune-export/plan"


def test_plan_records_true_macs(plan, geometry):
    plan.check(geometry, "tiny")
    assert plan.pruned_macs <= 0.6 * plan.dense_macs


def test_unequal_counts_across_heads_are_rejected(plan, geometry):
    b = plan.blocks[0]
    bad = dataclasses.replace(b, qk=(b.qk[0][:-1],) + b.qk[1:])
    with pytest.raises(PlanError, match="unequal qk counts"):
        bad.check(0, geometry)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: dataclasses.replace(b, mlp=b.mlp + (10_000,)), "out of range"),
        (lambda b: dataclasses.replace(b, mlp=tuple(reversed(b.mlp))), "sorted and unique"),
        (lambda b: dataclasses.replace(b, v=b.v[:-1]), "rows for"),
        (lambda b: dataclasses.replace(b, heads=()), "keeps no index"),
    ],
)
def test_malformed_blocks_are_rejected(plan, geometry, mutate, message):
    with pytest.raises(PlanError, match=message):
        mutate(plan.blocks[0]).check(0, geometry)


def test_false_mac_figures_are_rejected(plan, geometry):
    with pytest.raises(PlanError, match="MACs"):
        dataclasses.replace(plan, pruned_macs=plan.pruned_macs - 1).check(geometry)


def test_plan_for_another_model_is_rejected(plan, geometry):
    with pytest.raises(PlanError, match="made for tiny"):
        plan.check(geometry, "deit_base_patch16_224")


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"format": "other"}), json.dumps({"format": "prune-export/plan", "version": 1})])
def test_corrupt_plan_files_raise_plan_error(tmp_path, content):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(PlanError):
        Plan.load(path)


def test_missing_plan_file_raises_plan_error(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")


def test_dense_plan_keeps_everything(geometry):
    dense = Plan.dense("tiny", 32, geometry)
    dense.check(geometry)
    assert dense.mac_ratio == 1.0 and all(b.shared_indices for b in dense.blocks)
    assert isinstance(dense.blocks[0], BlockPlan)
