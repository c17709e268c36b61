"""Weighted k-nearest-neighbour accuracy of frozen features (the DINO k-NN protocol).

A pruned backbone has no classifier head to score, and training a probe would mix the probe's
quality into the figure. The k-NN protocol of DINO (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021) needs no training at all: each test feature is
labelled by a temperature-weighted vote of its k most cosine-similar training features. It is
therefore a label-free measure of the backbone itself, cheap enough to run during recovery to pick
the best checkpoint, and it exposes feature collapse that a distillation loss can hide.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from search.core.errors import DataError

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(values: ArrayLike, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    return tensor.detach().to(device=device, dtype=dtype)


def knn_predict(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predict a label for every test row by a temperature-weighted vote of its k nearest neighbours.

    Features are L2-normalised, so the dot product is the cosine similarity s. Each of the k most
    similar training rows votes for its label with weight exp(s / T); the class with the largest
    summed weight wins. A small T makes the closest neighbours dominate; a large T tends to a
    plain majority vote. Weights are computed relative to each row's best similarity, which
    leaves the vote unchanged and keeps exp from overflowing at small T. Test rows are processed ``chunk_size`` at a time so the similarity matrix
    held in memory is at most ``chunk_size`` x N_train. Exact ties go to the lower class index.

    Args:
        train_feats: (N_train, D) features of the labelled reference set.
        train_labels: (N_train,) integer labels in ``0..num_classes-1``.
        test_feats: (N_test, D) features to classify.
        k: Neighbours per vote; clamped to N_train. DINO uses 20.
        temperature: T in exp(s / T). DINO uses 0.07.
        num_classes: Number of classes; by default one more than the largest training label.
        chunk_size: Test rows per similarity block.

    Returns:
        (N_test,) int64 predicted labels on the device of ``train_feats``.

    Raises:
        DataError: The training set is empty.
        ValueError: Shapes disagree, or k, temperature, chunk_size or a label is out of range.
    """
    device = train_feats.device if isinstance(train_feats, torch.Tensor) else None
    train = _as_tensor(train_feats, torch.float32, device)
    test = _as_tensor(test_feats, torch.float32, device)
    labels = _as_tensor(train_labels, torch.int64, device)

    if train.ndim != 2 or test.ndim != 2:
        raise ValueError(f"features must be 2-D (rows, dim), got {tuple(train.shape)} and {tuple(test.shape)}")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train features have dim {train.shape[1]} but test features have dim {test.shape[1]}")
    if labels.shape != (train.shape[0],):
        raise ValueError(f"expected {train.shape[0]} train labels, got shape {tuple(labels.shape)}")
    if train.shape[0] == 0:
        raise DataError("the k-NN reference set is empty; pass at least one labelled training image")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative, got {int(labels.min())}")
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.max()) >= classes:
        raise ValueError(f"label {int(labels.max())} does not fit num_classes={classes}")

    k = min(k, train.shape[0])
    train = F.normalize(train, dim=1)
    test = F.normalize(test, dim=1)
    predictions = torch.empty(test.shape[0], dtype=torch.int64, device=train.device)
    for start in range(0, test.shape[0], chunk_size):
        block = test[start : start + chunk_size]
        sims, neighbours = (block @ train.T).topk(k, dim=1)
        weights = ((sims - sims[:, :1]) / temperature).exp()
        votes = torch.zeros(block.shape[0], classes, dtype=torch.float32, device=train.device)
        votes.scatter_add_(1, labels[neighbours], weights)
        predictions[start : start + block.shape[0]] = votes.argmax(dim=1)
    return predictions


def knn_top1(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    test_labels: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of weighted k-NN classification, the DINO protocol (Caron et al. 2021).

    See :func:`knn_predict` for the vote. This is how the accuracy kept by a pruned backbone is
    measured without training a head: the same frozen-feature evaluation for the dense and the
    pruned model, so the difference is the backbone's alone.

    Args:
        train_feats: (N_train, D) features of the labelled reference set.
        train_labels: (N_train,) integer labels.
        test_feats: (N_test, D) features of the held-out set.
        test_labels: (N_test,) integer labels.
        k: Neighbours per vote (DINO: 20).
        temperature: Vote temperature T (DINO: 0.07).
        num_classes: Number of classes; by default inferred from both label arrays.
        chunk_size: Test rows per similarity block, to bound memory.

    Returns:
        The fraction of test rows whose predicted label equals their true label, in [0, 1].

    Raises:
        DataError: The training or test set is empty.
        ValueError: Shapes or hyper-parameters are invalid.
    """
    truth = _as_tensor(test_labels, torch.int64)
    test_rows = test_feats.shape[0]
    if truth.shape != (test_rows,):
        raise ValueError(f"expected {test_rows} test labels, got shape {tuple(truth.shape)}")
    if test_rows == 0:
        raise DataError("the k-NN test set is empty; pass at least one labelled held-out image")
    if num_classes is None:
        train_max = int(_as_tensor(train_labels, torch.int64).max()) if len(train_labels) else -1
        num_classes = max(train_max, int(truth.max())) + 1
    predictions = knn_predict(
        train_feats, train_labels, test_feats, k=k, temperature=temperature,
        num_classes=num_classes, chunk_size=chunk_size,
    )
    return float((predictions.cpu() == truth).double().mean())
