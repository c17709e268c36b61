"""Fidelity: how close the pruned model stays to the dense one on held-out images.

Accuracy after recovery measures adaptation as much as preservation: fine-tuned on in-domain images,
a pruned backbone's k-NN can rise above the dense model's. What a user replacing the dense model
needs first is how much of its behaviour the file keeps, and that needs no labels:

- backbones: the mean cosine of pruned to dense features; k-NN neighbour agreement (for each query
  image, the share of its k nearest bank images that are the same under both models); relation
  agreement (the correlation of the two sample-by-sample cosine-similarity matrices, the geometry
  k-NN reads); and, where the images are labelled, the share of k-NN class predictions that agree;
- classifiers: top-1 agreement with the dense model and the mean KL divergence from the dense
  class distribution to the pruned one (nats).

The bank and the queries are the two halves of the held-out images, as in the k-NN accuracy.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from exporter.knn import knn_predict

NEIGHBOURS = 20
"""k of the neighbour agreement, as in the k-NN accuracy (DINO's protocol)."""


def sample_cosines(reference: np.ndarray | torch.Tensor, candidate: np.ndarray | torch.Tensor) -> np.ndarray:
    """The cosine of each sample's flattened output to its reference: 1 when both are zero, 0 when one is."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    ref_norm, cand_norm = np.linalg.norm(ref, axis=1), np.linalg.norm(cand, axis=1)
    norms = ref_norm * cand_norm
    cos = np.sum(ref * cand, axis=1) / np.where(norms > 0, norms, 1.0)
    both_zero = (ref_norm == 0) & (cand_norm == 0)
    return np.where(both_zero, 1.0, np.where(norms > 0, cos, 0.0))


def relation_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Pearson correlation of the off-diagonal cosine similarities of two feature sets of the same images."""
    def sims(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(torch.as_tensor(x).flatten(1).double(), dim=1)
        s = x @ x.T
        return s[torch.triu_indices(len(s), len(s), offset=1).unbind()]

    a, b = sims(student), sims(teacher)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def _neighbours(bank: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    return sims.topk(min(k, len(bank)), dim=1).indices


def neighbour_agreement(dense: torch.Tensor, pruned: torch.Tensor, k: int = NEIGHBOURS) -> float:
    """Mean share of each query's k nearest bank images that are the same under both feature sets.

    The first half of the rows is the bank and the second half the queries.
    """
    dense, pruned = torch.as_tensor(dense).flatten(1), torch.as_tensor(pruned).flatten(1)
    half = len(dense) // 2
    if half < 1 or len(dense) - half < 1:
        raise ValueError(f"neighbour agreement needs at least 2 images, got {len(dense)}")
    a, b = _neighbours(dense[:half], dense[half:], k), _neighbours(pruned[:half], pruned[half:], k)
    shared = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)]
    return float(np.mean(shared)) / a.shape[1]


def knn_label_agreement(dense: torch.Tensor, pruned: torch.Tensor, labels: torch.Tensor, k: int = NEIGHBOURS) -> float:
    """Share of the queries (second half) whose k-NN class prediction, voted by the labelled bank (first half), agrees."""
    dense, pruned = torch.as_tensor(dense).flatten(1).float(), torch.as_tensor(pruned).flatten(1).float()
    half = len(dense) // 2
    labels = torch.as_tensor(labels)
    classes = int(labels.max()) + 1
    a = knn_predict(dense[:half], labels[:half], dense[half:], k=k, num_classes=classes)
    b = knn_predict(pruned[:half], labels[:half], pruned[half:], k=k, num_classes=classes)
    return float((a == b).double().mean())


def top1_agreement(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> float:
    """Share of the images whose top-1 class is the same under both models."""
    return float((torch.as_tensor(dense_logits).argmax(-1) == torch.as_tensor(pruned_logits).argmax(-1)).double().mean())


def mean_kl(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> float:
    """Mean over the images of KL(dense ‖ pruned) between the two class distributions, in nats."""
    p = F.log_softmax(torch.as_tensor(dense_logits).double(), dim=-1)
    q = F.log_softmax(torch.as_tensor(pruned_logits).double(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def fidelity(dense: torch.Tensor, pruned: torch.Tensor, classifier: bool, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Every fidelity figure of ``pruned`` outputs against ``dense`` outputs of the same images (see the module doc)."""
    dense, pruned = torch.as_tensor(dense).float(), torch.as_tensor(pruned).float()
    if classifier:
        return {"images": len(dense), "top1_agreement": top1_agreement(dense, pruned), "mean_kl": mean_kl(dense, pruned)}
    out: dict[str, Any] = {
        "images": len(dense),
        "feature_cosine": float(sample_cosines(dense, pruned).mean()),
        "knn_agreement": neighbour_agreement(dense, pruned),
        "relation_agreement": relation_agreement(pruned, dense),
    }
    if labels is not None:
        out["knn_label_agreement"] = knn_label_agreement(dense, pruned, labels)
    return out
