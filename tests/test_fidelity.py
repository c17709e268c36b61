"""Fidelity metrics against hand-computed cases, and their place in a run's report."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from exporter.cli import app
from exporter.fidelity import (
    fidelity,
    knn_label_agreement,
    mean_kl,
    neighbour_agreement,
    relation_agreement,
    sample_cosines,
    top1_agreement,
)


def test_sample_cosines_by_hand_with_one_rule_for_zero_vectors():
    ref = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    cand = np.array([[0.0, 2.0], [2.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(sample_cosines(ref, cand), [0.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(sample_cosines(np.array([[3.0, 4.0]]), np.array([[4.0, 3.0]])), [24 / 25])


def test_top1_agreement_and_kl_by_hand():
    dense = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pruned = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert top1_agreement(dense, pruned) == pytest.approx(2 / 3)
    p = torch.softmax(dense.double(), -1)
    q = torch.softmax(pruned.double(), -1)
    by_hand = [sum(p[i, j] * math.log(p[i, j] / q[i, j]) for j in range(2)) for i in range(3)]
    assert mean_kl(dense, pruned) == pytest.approx(float(np.mean(by_hand)))
    assert mean_kl(dense, dense) == pytest.approx(0.0, abs=1e-12)


def test_neighbour_agreement_by_hand():
    # bank = rows 0-2, queries = rows 3-5; with k=1 each query's nearest bank row
    dense = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [-0.9, 0.1]])
    assert neighbour_agreement(dense, dense, k=1) == 1.0
    swapped = dense.clone()
    swapped[3] = torch.tensor([0.1, 0.9])  # query 0 now nearest to bank row 1 instead of 0
    assert neighbour_agreement(dense, swapped, k=1) == pytest.approx(2 / 3)
    # k=2: query 0's two nearest are {0, 1} under dense and {1, 0} under swapped; all sets agree
    assert neighbour_agreement(dense, swapped, k=2) == pytest.approx(1.0)
    assert neighbour_agreement(dense, swapped, k=20) == 1.0  # k clamps to the bank, so every set is the whole bank


def test_knn_label_agreement_by_hand():
    dense = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 1])
    assert knn_label_agreement(dense, dense, labels, k=1) == 1.0
    flipped = dense.clone()
    flipped[2] = torch.tensor([0.1, 0.9])
    assert knn_label_agreement(dense, flipped, labels, k=1) == 0.5


def test_relation_agreement_is_one_for_a_rotation_and_drops_for_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 8, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    assert relation_agreement(x @ q, x) == pytest.approx(1.0, abs=1e-9)
    assert relation_agreement(torch.randn(20, 8, generator=gen), x) < 0.5


def test_fidelity_keys_by_kind():
    x = torch.randn(6, 4)
    backbone = fidelity(x, x, classifier=False, labels=torch.tensor([0, 1, 0, 1, 0, 1]))
    assert backbone["feature_cosine"] == pytest.approx(1.0) and backbone["knn_agreement"] == 1.0
    assert backbone["relation_agreement"] == pytest.approx(1.0) and backbone["knn_label_agreement"] == 1.0
    assert set(fidelity(x, x, classifier=True)) == {"images", "top1_agreement", "mean_kl"}


def test_a_run_reports_fidelity_first(tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["test_vit", "--random-init", "--budget", "0.5", "--latency-runs", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    fid = report["fidelity"]
    assert 0.0 <= fid["top1_agreement"] <= 1.0 and fid["mean_kl"] >= 0.0 and fid["images"] > 0
    md = out.with_suffix(".md").read_text()
    assert md.index("fidelity") < md.index("MACs")
    assert result.output.index("top-1 agreement to dense") < result.output.index("GMACs")
