"""The refits of compensation: one linear layer by ridge toward its own weights, to a branch or stream target."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from search.cut.least_squares import NormalEquations, load_fit, prior_of, ridge_solve


def normal_equations(inputs: Iterable[torch.Tensor], targets: Iterable[torch.Tensor], widths: tuple[int, int],
                     token_w: list[torch.Tensor] | None = None) -> NormalEquations:
    """The sums of one fit from batches of inputs and targets, each token weighted by ``token_w`` (per batch) when given."""
    eq = NormalEquations(*widths)
    for n, (z, t) in enumerate(zip(inputs, targets)):
        eq.add(z, t, None if token_w is None else token_w[n])
    return eq


def row_weights(scale: torch.Tensor | None) -> torch.Tensor | None:
    """The per-output weights of a fit to the residual stream through ``scale``: its square (None: all outputs alike)."""
    return None if scale is None else scale.double().pow(2).clamp_min(1e-12)


def fit_layer(layer: nn.Linear, inputs: Iterable[torch.Tensor], targets: Iterable[torch.Tensor], ridge: float,
              scale: torch.Tensor | None, weights: list[torch.Tensor] | None = None) -> None:
    """Refit ``layer`` by ridge toward its own weights so that ``scale ⊙ layer(inputs)`` matches ``scale ⊙ targets``."""
    eq = normal_equations(inputs, targets, (layer.in_features, layer.out_features), weights)
    load_fit(layer, ridge_solve(eq, prior_of(layer), ridge, row_weights=row_weights(scale), bias=layer.bias is not None))


def stream_target(layer_out: list[torch.Tensor], dense_stream: list[torch.Tensor], pruned_stream: list[torch.Tensor],
                   scale: torch.Tensor) -> list[torch.Tensor]:
    """What the layer should output so that pruned stream + scale ⊙ output equals the dense stream + scale ⊙ dense output."""
    s = scale.to(layer_out[0].device)
    safe = torch.where(s.abs() > 1e-12, s, torch.ones_like(s))
    return [o + (d - p) / safe for o, d, p in zip(layer_out, dense_stream, pruned_stream)]


