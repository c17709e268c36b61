"""Attention kinds: what the rest of the pipeline needs to know about one kind of attention.

A kind answers three questions for a module it recognises:
- its shape (heads, q/k width per head, v width per head), so the Plan and the MAC count can be built;
- the MACs of its token-mixing products at given widths (softmax: N²·d terms; linear: N·d² terms);
- the q, k, v and output-projection weights seen per head, so importance can be scored.

Surgery keeps a slicer per kind (``exporter.slicing``); the MAC counter and the budget solver only
call the kind. Adding a kind therefore means one entry here and one slicer there, and neither the
surgery loop nor the MAC count changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from search.errors import UnknownModelError


@dataclass(frozen=True)
class AttentionShape:
    """Dense widths of one attention module.

    Attributes:
        embed_dim: width of the tokens going in and out.
        num_heads: number of heads.
        qk_dim: q/k channels per head.
        v_dim: v channels per head.
    """

    embed_dim: int
    num_heads: int
    qk_dim: int
    v_dim: int


@dataclass(frozen=True)
class HeadWeights:
    """An attention module's linear weights, reshaped per head.

    Attributes:
        q, k: (heads, qk_dim, embed_dim) rows of the input projection.
        v: (heads, v_dim, embed_dim) rows of the input projection.
        proj: (embed_dim, heads, v_dim) columns of the output projection.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    proj: torch.Tensor


class AttentionKind(Protocol):
    """The interface every kind of attention provides to search and surgery."""

    name: str

    def matches(self, module: nn.Module) -> bool:
        """True when ``module`` is an attention module of this kind."""

    def shape(self, module: nn.Module) -> AttentionShape:
        """The module's dense widths; raises UnknownModelError for variants we cannot prune."""

    def product_macs(self, tokens: int, heads: int, qk: int, v: int) -> int:
        """MACs of the token-mixing products (everything but the qkv and output projections)."""

    def head_weights(self, module: nn.Module) -> HeadWeights:
        """The q/k/v/proj weights seen per head."""


_KINDS: dict[str, AttentionKind] = {}


def register_kind(kind: AttentionKind) -> AttentionKind:
    """Add a kind to the registry; kinds are tried in registration order."""
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> AttentionKind:
    """The registered kind called ``name``."""
    return _KINDS[name]


def kind_of(module: nn.Module) -> AttentionKind:
    """The registered kind that recognises ``module``."""
    for kind in _KINDS.values():
        if kind.matches(module):
            return kind
    raise UnknownModelError(
        f"attention module {type(module).__name__} is not a kind prune-export can prune "
        f"(known: {', '.join(_KINDS)}); use a timm ViT/DeiT model"
    )


def split_fused_qkv(
    weight: torch.Tensor, heads: int, qk: int, v: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused qkv weight or bias (rows ordered q | k | v, head-major) into per-head views."""
    q, k, vv = torch.split(weight, [heads * qk, heads * qk, heads * v], dim=0)
    tail = weight.shape[1:]
    return q.reshape(heads, qk, *tail), k.reshape(heads, qk, *tail), vv.reshape(heads, v, *tail)


@dataclass(frozen=True)
class SoftmaxAttentionKind:
    """timm's ``Attention`` and prune-export's own ``PrunedAttention``: softmax(q kᵀ·scale) v.

    Products per image: q·kᵀ costs H·N²·d_qk MACs and attn·v costs H·N²·d_v MACs.
    """

    name: str = "softmax"
    class_names: tuple[str, ...] = ("Attention", "PrunedAttention")

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.class_names and hasattr(module, "qkv")

    def shape(self, module: nn.Module) -> AttentionShape:
        for part in ("q_norm", "k_norm", "norm"):
            sub = getattr(module, part, None)
            if sub is not None and not isinstance(sub, nn.Identity):
                raise UnknownModelError(
                    f"attention with {part} normalisation cannot be pruned channel-wise; "
                    "choose a ViT/DeiT without qk_norm or scale_norm"
                )
        if getattr(module, "gate", None) is not None:
            raise UnknownModelError("gated attention is not supported; choose a ViT/DeiT without it")
        heads = module.num_heads
        qk = getattr(module, "qk_dim", None) or module.head_dim
        v = getattr(module, "v_dim", None) or module.head_dim
        return AttentionShape(embed_dim=module.qkv.in_features, num_heads=heads, qk_dim=qk, v_dim=v)

    def product_macs(self, tokens: int, heads: int, qk: int, v: int) -> int:
        return heads * tokens * tokens * (qk + v)

    def head_weights(self, module: nn.Module) -> HeadWeights:
        s = self.shape(module)
        q, k, v = split_fused_qkv(module.qkv.weight, s.num_heads, s.qk_dim, s.v_dim)
        proj = module.proj.weight.reshape(module.proj.out_features, s.num_heads, s.v_dim)
        return HeadWeights(q=q, k=k, v=v, proj=proj)


register_kind(SoftmaxAttentionKind())
