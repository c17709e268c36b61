"""Slicing primitives: one small function per layer type, each checking its indices first.

Attention kinds and model families build their smaller modules from these, so an index error is
caught here, with a message, before a tensor is cut.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def check_indices(indices: Sequence[int], size: int, what: str) -> None:
    """Raise ValueError unless ``indices`` are unique and within [0, size)."""
    if len(set(indices)) != len(indices) or any(not 0 <= i < size for i in indices):
        raise ValueError(f"{what}: indices must be unique and within [0, {size})")


@torch.no_grad()
def slice_linear(linear: nn.Linear, out_idx: Sequence[int] | None = None, in_idx: Sequence[int] | None = None) -> nn.Linear:
    """A new Linear with only rows ``out_idx`` and columns ``in_idx`` of ``linear`` (None keeps all)."""
    out_idx = list(range(linear.out_features)) if out_idx is None else list(out_idx)
    in_idx = list(range(linear.in_features)) if in_idx is None else list(in_idx)
    check_indices(out_idx, linear.out_features, "linear rows")
    check_indices(in_idx, linear.in_features, "linear columns")
    rows = torch.tensor(out_idx, device=linear.weight.device)
    cols = torch.tensor(in_idx, device=linear.weight.device)
    new = nn.Linear(len(in_idx), len(out_idx), bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(linear.weight[rows][:, cols])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[rows])
    return new
