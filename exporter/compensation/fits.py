"""The refits of compensation: one linear layer by ridge toward its own weights, to a branch or stream target."""
from __future__ import annotations

import torch
from torch import nn

from search.cut.least_squares import NormalEquations, load_fit, prior_of, ridge_solve


def fit_layer(layer: nn.Linear, inputs: list[torch.Tensor], targets: list[torch.Tensor], ridge: float,
               scale: torch.Tensor | None, weights: list[torch.Tensor] | None = None) -> None:
    """Refit ``layer`` by ridge toward its own weights so that ``scale ⊙ layer(inputs)`` matches ``scale ⊙ targets``."""
    eq = NormalEquations(layer.in_features, layer.out_features)
    for n, (z, t) in enumerate(zip(inputs, targets)):
        eq.add(z, t, None if weights is None else weights[n])
    weights = None if scale is None else scale.double().pow(2).clamp_min(1e-12)
    load_fit(layer, ridge_solve(eq, prior_of(layer), ridge, row_weights=weights, bias=layer.bias is not None))


def stream_target(layer_out: list[torch.Tensor], dense_stream: list[torch.Tensor], pruned_stream: list[torch.Tensor],
                   scale: torch.Tensor) -> list[torch.Tensor]:
    """What the layer should output so that pruned stream + scale ⊙ output equals the dense stream + scale ⊙ dense output."""
    s = scale.to(layer_out[0].device)
    safe = torch.where(s.abs() > 1e-12, s, torch.ones_like(s))
    return [o + (d - p) / safe for o, d, p in zip(layer_out, dense_stream, pruned_stream)]


