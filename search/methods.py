"""Selection methods: named ways of scoring channels, all ending in the same budget solver.

Each method maps the dense model (and images, for the methods that look at activations) to one
``BlockScores`` per block; ``search.allocate.make_plan`` turns any method's scores into a Plan, so
methods differ only in what they think matters.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from search.acp import AcpConfig, acp_search
from search.importance import BlockScores, magnitude_scores, random_scores
from search.macs import ModelGeometry
from search.core.runtime import Runtime


@dataclass(frozen=True)
class SearchInputs:
    """What a method may look at.

    Attributes:
        model: the dense model.
        geometry: its geometry.
        images: preprocessed images (from --data, or random inputs without it).
        classifier: whether the model outputs logits (else token features).
        acp: settings of the acp search (budget, steps, ablation switches).
        runtime: device and process group.
        state_path: where a resumable method checkpoints its state.
    """

    model: nn.Module
    geometry: ModelGeometry
    images: torch.Tensor
    classifier: bool
    acp: AcpConfig
    runtime: Runtime
    state_path: Path | None = None


@dataclass(frozen=True)
class Method:
    """A selection method: its scoring function, and whether its scores need per-group normalising."""

    score: Callable[[SearchInputs], tuple[BlockScores, ...]]
    normalise: bool


METHODS: dict[str, Method] = {
    "acp": Method(
        lambda i: acp_search(i.model, i.geometry, i.images, i.acp, i.classifier, i.runtime, i.state_path),
        normalise=False,
    ),
    "magnitude": Method(lambda i: magnitude_scores(i.model), normalise=True),
    "random": Method(lambda i: random_scores(i.geometry, i.acp.seed), normalise=True),
}


def method_names() -> list[str]:
    return sorted(METHODS)
