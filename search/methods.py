"""Selection methods: named ways of scoring channels, all ending in the same budget solver.

Each method maps the dense model (and calibration images, for the methods that look at
activations) to one ``BlockScores`` per block. ``search.allocate.make_plan`` then turns any
method's scores into a Plan, so methods differ only in what they think matters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from search.importance import BlockScores, magnitude_scores, random_scores
from search.macs import ModelGeometry


@dataclass(frozen=True)
class SearchInputs:
    """What a method may look at: the dense model, its geometry, calibration images and a seed."""

    model: nn.Module
    geometry: ModelGeometry
    images: torch.Tensor
    seed: int


ScoreFn = Callable[[SearchInputs], tuple[BlockScores, ...]]

METHODS: dict[str, ScoreFn] = {
    "magnitude": lambda inputs: magnitude_scores(inputs.model),
    "random": lambda inputs: random_scores(inputs.geometry, inputs.seed),
}


def method_names() -> list[str]:
    return sorted(METHODS)
