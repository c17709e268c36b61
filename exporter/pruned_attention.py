"""A timm-compatible softmax attention with separate q/k and v head widths.

After surgery the q/k width per head and the v width per head differ from each other and from the
dense head_dim, but the softmax scale must stay the dense one (1/sqrt(dense head_dim)): the trained
weights expect it. timm's Attention derives its scale from head_dim, so it cannot hold a pruned block.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class PrunedAttention(nn.Module):
    """Multi-head softmax attention: softmax(q kᵀ · scale) v, heads of qk_dim and v_dim channels.

    ``reweight`` (identity unless recovery adds one) acts on the attention output right before
    ``proj``, so it folds exactly into proj's weights before export.

    Args:
        dim: token width in and out.
        num_heads: number of heads.
        qk_dim: q/k channels per head.
        v_dim: v channels per head.
        scale: softmax scale, kept from the dense model.
        qkv_bias: whether the fused qkv projection has a bias.
        proj_bias: whether the output projection has a bias.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        scale: float,
        qkv_bias: bool = True,
        proj_bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.head_dim = qk_dim
        self.scale = scale
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.reweight: nn.Module = nn.Identity()
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).split([h * self.qk_dim, h * self.qk_dim, h * self.v_dim], dim=-1)
        q = q.reshape(b, n, h, self.qk_dim).transpose(1, 2)
        k = k.reshape(b, n, h, self.qk_dim).transpose(1, 2)
        v = v.reshape(b, n, h, self.v_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(self.reweight(x.transpose(1, 2).reshape(b, n, h * self.v_dim)))
