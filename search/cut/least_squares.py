"""Ridge least squares for refitting a linear layer after its inputs were cut.

A cut removes some inputs of a linear layer (v channels of proj, hidden units of fc2, q/k channels
of the logits). What is kept can often say much of what was removed, so the layer's remaining
weights are refitted to reproduce a target (the dense model's output) from the kept inputs alone:

    min_W  Σ_i w_i Σ_n s_n (W_i z̃_n - t_ni)²  +  λ ‖W_i - W⁰_i‖²        (z̃ = [z, 1]: the bias is a column of W)

over calibration samples z_n (rows of the kept inputs), each weighted by s_n. The ridge pulls toward ``W⁰``, the sliced
dense weights, not toward zero: with λ → ∞ the fit is the plain cut, so the fitted error on the
calibration set is never above the cut's own (the cut's weights are one of the candidates).
``w_i`` weights output row i: where a layer's output reaches the residual stream through a
per-channel scale γ (LayerScale), matching the stream means w_i = γ_i², and rows that barely reach
the stream stay near the dense weights.

Only sums over samples are kept (:class:`NormalEquations`), so the inputs never need to be held
at once: the cost is one (inputs + 1)² Gram matrix, whatever the number of calibration tokens.
"""
from __future__ import annotations

import torch
from torch import nn


class NormalEquations:
    """Running sums Σ z̃ z̃ᵀ and Σ t z̃ᵀ of a least-squares problem, accumulated batch by batch.

    Each batch's products are taken in float32 on the samples' device (the GPU when the run has
    one) and summed in float64 there, so many batches add up without losing the small eigenvalues.

    Args:
        inputs: features of z (the bias column is added here).
        outputs: features of t.
    """

    def __init__(self, inputs: int, outputs: int) -> None:
        self.inputs, self.outputs = inputs, outputs
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.samples = 0

    def add(self, z: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add samples: ``z`` (…, inputs) and ``t`` (…, outputs) with the same leading shape, each weighted by ``weights`` (…)."""
        z = z.detach().reshape(-1, self.inputs).float()
        t = t.detach().reshape(-1, self.outputs).float().to(z.device)
        z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], dim=1)
        if weights is not None:
            t = t * weights.detach().reshape(-1, 1).float().to(z.device)
        if self.gram is None:
            self.gram = torch.zeros(self.inputs + 1, self.inputs + 1, dtype=torch.float64, device=z.device)
            self.cross = torch.zeros(self.outputs, self.inputs + 1, dtype=torch.float64, device=z.device)
        zw = z if weights is None else z * weights.detach().reshape(-1, 1).float().to(z.device)
        self.gram += (zw.T @ z).double()
        self.cross += (t.T @ z).double()
        self.samples += len(z)


def ridge_solve(eq: NormalEquations, prior: torch.Tensor, ridge: float, row_weights: torch.Tensor | None = None,
                bias: bool = True) -> torch.Tensor:
    """The minimiser W̃ (outputs × inputs + 1) of the weighted ridge problem in the module docstring.

    Args:
        eq: the accumulated sums.
        prior: W⁰ with its bias as the last column, (outputs, inputs + 1).
        ridge: λ relative to the mean diagonal of the Gram matrix (so one value serves every layer and
            calibration size), times the mean row weight.
        row_weights: w_i per output row (None: all 1).
        bias: fit a bias; False pins it at 0 (for a layer that has none) and returns a zero last column.

    One eigendecomposition of the Gram matrix serves every row, however the rows are weighted:
    row i is ((w_i c_i + λ W⁰_i) U) / (w_i Λ + λ) Uᵀ, with G = U Λ Uᵀ.
    """
    if eq.gram is None or eq.cross is None:
        raise ValueError("no calibration samples were added")
    outputs = eq.cross.shape[0]
    w = torch.ones(outputs, dtype=torch.float64) if row_weights is None else row_weights.detach().to(torch.float64).cpu()
    keep = slice(None) if bias else slice(0, -1)
    gram, cross = eq.gram.cpu()[keep, keep], eq.cross.cpu()[:, keep]
    prior = prior.detach().to(torch.float64).cpu()[:, keep]
    lam = max(ridge * float(gram.diagonal().mean()) * float(w.mean()), 1e-12)
    evals, evecs = torch.linalg.eigh(gram)
    rhs = (w[:, None] * cross + lam * prior) @ evecs
    fitted = (rhs / (w[:, None] * evals.clamp_min(0.0)[None, :] + lam)) @ evecs.T
    return fitted if bias else torch.cat([fitted, fitted.new_zeros(outputs, 1)], dim=1)


def prior_of(linear: nn.Linear) -> torch.Tensor:
    """A layer's weights with its bias (zeros without one) as the last column: the W⁰ of :func:`ridge_solve`."""
    bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
    return torch.cat([linear.weight.detach(), bias.detach()[:, None]], dim=1)


@torch.no_grad()
def load_fit(linear: nn.Linear, fitted: torch.Tensor, rows: slice | None = None) -> None:
    """Write a fitted W̃ (weights | bias column) into ``linear``, in place (only ``rows`` when given).

    A layer without a bias keeps none: solve its fit with ``bias=False``, which pins that column at 0.
    """
    rows = slice(None) if rows is None else rows
    linear.weight[rows] = fitted[:, :-1].to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias[rows] = fitted[:, -1].to(linear.bias.dtype)
