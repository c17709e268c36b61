"""Slicing primitives: one small function per layer kind, each checking its indices first.

``slice_linear`` keeps chosen output rows and/or input columns of a Linear. ``ATTENTION_SLICERS``
maps an attention kind's name (``search.attention_kinds``) to the function that turns one dense
attention module and its BlockPlan into a physically smaller module. A new attention kind adds
its slicer here; surgery does not change.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from exporter.pruned_attention import PrunedAttention
from search.attention_kinds import kind_of
from search.plan import BlockPlan


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
    rows, cols = torch.tensor(out_idx), torch.tensor(in_idx)
    new = nn.Linear(len(in_idx), len(out_idx), bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(linear.weight[rows][:, cols])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[rows])
    return new


def _head_rows(offset: int, width: int, heads: Sequence[int], rows: Sequence[Sequence[int]]) -> list[int]:
    return [offset + h * width + c for h, kept in zip(heads, rows) for c in kept]


def slice_softmax_attention(attn: nn.Module, plan: BlockPlan) -> PrunedAttention:
    """Keep the plan's heads and their q/k and v channels; the softmax scale stays the dense one."""
    shape = kind_of(attn).shape(attn)
    h, dqk, dv = shape.num_heads, shape.qk_dim, shape.v_dim
    q_rows = _head_rows(0, dqk, plan.heads, plan.qk)
    k_rows = _head_rows(h * dqk, dqk, plan.heads, plan.qk)
    v_rows = _head_rows(2 * h * dqk, dv, plan.heads, plan.v)
    v_cols = _head_rows(0, dv, plan.heads, plan.v)
    widths = plan.widths
    new = PrunedAttention(
        dim=shape.embed_dim,
        num_heads=widths.heads,
        qk_dim=widths.qk,
        v_dim=widths.v,
        scale=float(attn.scale),
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
    )
    new.qkv = slice_linear(attn.qkv, out_idx=q_rows + k_rows + v_rows)
    new.proj = slice_linear(attn.proj, in_idx=v_cols)
    return new.train(attn.training)


ATTENTION_SLICERS: dict[str, Callable[[nn.Module, BlockPlan], nn.Module]] = {
    "softmax": slice_softmax_attention,
}


def slice_mlp(mlp: nn.Module, units: Sequence[int]) -> None:
    """Keep hidden ``units`` of a timm Mlp in place: rows of fc1, columns of fc2."""
    mlp.fc1 = slice_linear(mlp.fc1, out_idx=units)
    mlp.fc2 = slice_linear(mlp.fc2, in_idx=units)
