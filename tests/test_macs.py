"""The analytic MAC count agrees with an independent count of the exported ONNX graph."""
from __future__ import annotations

import pytest
import timm

from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs
from exporter.surgery import apply_plan
from search.budget.allocate import SolverConfig, make_plan
from search.methods.importance import random_scores
from search.budget.macs import describe, model_macs


def _graph_macs(model, tmp_path, name):
    path = export_onnx(model, tmp_path / f"{name}.onnx", (3, *model.patch_embed.img_size))
    return count_onnx_macs(path)


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_analytic_count_matches_onnx_graph(tiny_model, tmp_path, budget):
    geometry = describe(tiny_model)
    plan = make_plan(geometry, random_scores(geometry, 0), SolverConfig(budget, align=4), model="tiny", img_size=32, method="random")
    pruned = apply_plan(tiny_model, plan)
    graph = _graph_macs(pruned, tmp_path, "pruned")
    assert abs(graph - plan.pruned_macs) <= 0.005 * plan.pruned_macs


def test_test_vit_pruned_count_matches_graph(test_vit, tmp_path):
    geometry = describe(test_vit)
    plan = make_plan(geometry, random_scores(geometry, 2), SolverConfig(0.63), model="test_vit", img_size=160, method="random")
    graph = _graph_macs(apply_plan(test_vit, plan), tmp_path, "tv")
    assert abs(graph - plan.pruned_macs) <= 0.005 * plan.pruned_macs


def test_deit_b_dense_is_17_56_gmacs():
    model = timm.create_model("deit_base_patch16_224", pretrained=False)
    assert round(model_macs(describe(model)) / 1e9, 2) == 17.56


@pytest.mark.slow
def test_deit_b_count_matches_graph(tmp_path):
    model = timm.create_model("deit_base_patch16_224", pretrained=False).eval()
    analytic = model_macs(describe(model))
    assert abs(_graph_macs(model, tmp_path, "deit_b") - analytic) <= 0.005 * analytic
