"""Capture what each block computes on a calibration batch: qkv output and MLP hidden activations.

Similarity weights and the attention-difference initialisation both read these, so they are
captured once, by forward hooks, in one pass of the dense model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from search.macs import ModelGeometry


@dataclass(frozen=True)
class BlockActivations:
    """One block's activations on a calibration batch.

    Attributes:
        q, k: (batch, heads, tokens, qk_dim).
        v: (batch, heads, tokens, v_dim).
        hidden: (batch, tokens, mlp_hidden) MLP activations after the non-linearity.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor


@torch.no_grad()
def capture(model: nn.Module, geometry: ModelGeometry, images: torch.Tensor) -> tuple[BlockActivations, ...]:
    """Run ``model`` on ``images`` once and return every block's activations (fp32, on the model's device)."""
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.qkv.register_forward_hook(lambda m, a, out, i=i: store.__setitem__((i, "qkv"), out.detach())))
        handles.append(block.mlp.act.register_forward_hook(lambda m, a, out, i=i: store.__setitem__((i, "hidden"), out.detach())))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    result = []
    for i, g in enumerate(geometry.blocks):
        a = g.attention
        qkv = store[(i, "qkv")].float()
        b, n, _ = qkv.shape
        q, k, v = qkv.split([a.num_heads * a.qk_dim, a.num_heads * a.qk_dim, a.num_heads * a.v_dim], dim=-1)
        result.append(
            BlockActivations(
                q=q.reshape(b, n, a.num_heads, a.qk_dim).transpose(1, 2),
                k=k.reshape(b, n, a.num_heads, a.qk_dim).transpose(1, 2),
                v=v.reshape(b, n, a.num_heads, a.v_dim).transpose(1, 2),
                hidden=store[(i, "hidden")].float(),
            )
        )
    return tuple(result)
