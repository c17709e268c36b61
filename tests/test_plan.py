"""The Plan: JSON round trip, and the invariants it refuses to break."""
from __future__ import annotations

import dataclasses
import json

import pytest

from search.budget.allocate import SolverConfig, make_plan
from search.core.errors import PlanError
from search.methods.importance import random_scores
from search.budget.macs import describe
from search.attention import get_kind
from search.budget.macs import model_macs
from search.budget.plan import VERSION, Plan, check_block
from search.cut.blocks import BlockPlan
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
        check_block(bad, 0, geometry)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: dataclasses.replace(b, mlp=b.mlp + (10_000,)), "out of range"),
        (lambda b: dataclasses.replace(b, mlp=tuple(reversed(b.mlp))), "sorted and unique"),
        (lambda b: dataclasses.replace(b, v=b.v[:-1]), "rows for"),
        (lambda b: dataclasses.replace(b, heads=()), "4 qk rows for 0 kept heads"),
        (lambda b: dataclasses.replace(b, mlp=()), "keeps no index"),
        (lambda b: dataclasses.replace(b, heads=(), qk=(), v=((0,),)), "1 v rows for 0 kept heads"),
    ],
)
def test_malformed_blocks_are_rejected(plan, geometry, mutate, message):
    with pytest.raises(PlanError, match=message):
        check_block(mutate(plan.blocks[0]), 0, geometry)


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


def test_a_block_may_keep_no_head_and_then_counts_no_attention_mac(geometry):
    dense = Plan.dense("tiny", 32, geometry)
    empty = dataclasses.replace(dense.blocks[0], heads=(), qk=(), v=())
    check_block(empty, 0, geometry)
    assert empty.widths.heads == empty.widths.qk == empty.widths.v == 0 and empty.shared_indices
    widths = (empty.widths,) + dense.widths()[1:]
    plan = dataclasses.replace(dense, method="dsp", blocks=(empty,) + dense.blocks[1:], pruned_macs=model_macs(geometry, widths))
    plan.check(geometry, "tiny")
    attention = get_kind(geometry.blocks[0].kind).macs(geometry.blocks[0].attention, 4, 16, 16, geometry.layout)
    assert dense.pruned_macs - plan.pruned_macs == attention > 0
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


def test_a_version_1_plan_file_still_loads(tmp_path, plan):
    data = plan.to_dict()
    assert data["version"] == VERSION == 2
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({**data, "version": 1}))
    assert Plan.load(path) == plan
    path.write_text(json.dumps({**data, "version": 3}))
    with pytest.raises(PlanError, match="v1 or v2"):
        Plan.load(path)
