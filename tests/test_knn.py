"""The DINO weighted k-NN evaluation: exact on separable data, weighted by similarity, chance on noise."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from search.core.errors import DataError
from exporter.knn import knn_predict, knn_top1


def _clusters(rows_per_class: int, classes: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(classes, dim) * 10.0
    labels = np.repeat(np.arange(classes), rows_per_class)
    feats = centres[labels] + noise * rng.standard_normal((labels.size, dim))
    return feats.astype(np.float32), labels


def test_separable_clusters_score_one() -> None:
    train_x, train_y = _clusters(30, 10, 32, noise=0.5, seed=0)
    test_x, test_y = _clusters(10, 10, 32, noise=0.5, seed=1)
    assert knn_top1(train_x, train_y, test_x, test_y) == 1.0


def _angle(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_close_neighbour_outvotes_a_distant_majority() -> None:
    train = torch.tensor([_angle(0), _angle(60), _angle(-60)])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([_angle(0)])
    # T = 0.07: weight exp(1/T) for class 1 beats 2 * exp(0.5/T) for class 0.
    assert knn_predict(train, labels, query, k=3, temperature=0.07).tolist() == [1]
    # T = 100: the weights are almost equal, so two votes beat one.
    assert knn_predict(train, labels, query, k=3, temperature=100.0).tolist() == [0]
    # k = 1 sees only the closest neighbour.
    assert knn_predict(train, labels, query, k=1, temperature=100.0).tolist() == [1]


def test_vote_uses_cosine_not_euclidean_distance() -> None:
    train = torch.tensor([[100.0, 1.0], [0.1, 0.1]])
    labels = torch.tensor([0, 1])
    query = torch.tensor([[0.2, 0.2]])
    assert knn_predict(train, labels, query, k=1).tolist() == [1]


def test_shuffled_labels_score_about_chance() -> None:
    train_x, train_y = _clusters(200, 10, 32, noise=0.5, seed=5)
    test_x, test_y = _clusters(100, 10, 32, noise=0.5, seed=6)
    shuffled = np.random.default_rng(0).permutation(train_y)
    assert knn_top1(train_x, train_y, test_x, test_y) == 1.0
    assert knn_top1(train_x, shuffled, test_x, test_y, num_classes=10) < 0.3


def test_chunking_and_input_types_do_not_change_the_result() -> None:
    train_x, train_y = _clusters(20, 5, 16, noise=8.0, seed=2)
    test_x, test_y = _clusters(20, 5, 16, noise=8.0, seed=3)
    whole = knn_predict(train_x, train_y, test_x, chunk_size=10_000)
    chunked = knn_predict(train_x, train_y, test_x, chunk_size=7)
    assert torch.equal(whole, chunked)
    from_torch = knn_top1(torch.from_numpy(train_x), torch.from_numpy(train_y),
                          torch.from_numpy(test_x), torch.from_numpy(test_y))
    assert from_torch == knn_top1(train_x, train_y, test_x, test_y)
    assert 0.0 < from_torch < 1.0


def test_k_larger_than_the_reference_set_is_clamped() -> None:
    train_x, train_y = _clusters(2, 3, 8, noise=0.1, seed=4)
    assert knn_top1(train_x, train_y, train_x, train_y, k=20) == 1.0


def test_bad_inputs_are_refused() -> None:
    feats = np.zeros((4, 8), dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(DataError, match="reference set is empty"):
        knn_top1(feats[:0], labels[:0], feats, labels)
    with pytest.raises(DataError, match="test set is empty"):
        knn_top1(feats, labels, feats[:0], labels[:0])
    with pytest.raises(ValueError, match="dim"):
        knn_top1(feats, labels, np.zeros((4, 3), dtype=np.float32), labels)
    with pytest.raises(ValueError, match="num_classes"):
        knn_top1(feats, labels, feats, labels, num_classes=1)
    with pytest.raises(ValueError, match="temperature"):
        knn_top1(feats, labels, feats, labels, temperature=0.0)
