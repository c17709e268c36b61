"""timm's Beit (BEiT, BEiT v2): ViT blocks whose attention adds a relative position bias.

BEiT's attention differs from timm's ``Attention`` in two ways: its q and v biases are separate
parameters (k has none) that it adds with ``F.linear``, so nothing can hook its qkv projection; and
each head adds a learned bias to its scores, gathered from a table by relative position (plus,
in some models, a bias shared by all blocks). :meth:`BeitFamily.prepare` rewrites each block's
attention, once, into the softmax kind's own :class:`PrunedAttention` computing the same function:
one qkv Linear whose bias is [q_bias | 0 | v_bias], and the gathered bias, shared part included,
as its (heads, tokens, tokens) score bias. The softmax kind then owns it like any other: gates,
capture, attention differences (with the bias in the scores), slicing (a kept head keeps its
bias) and MACs (the bias is an Add). This fixes the token grid to the model's own, which is what
the export does anyway.

Blocks are pre-norm with optional per-channel scales ``gamma_1``/``gamma_2`` instead of
LayerScale modules; a block that keeps no head becomes a :class:`BeitAttentionlessBlock`.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from torch import nn

from search.attention.base import TokenLayout
from search.attention.removed import RemovedAttention
from search.attention.softmax import PrunedAttention
from search.core.errors import UnknownModelError
from search.families.base import register_family
from search.families.vit import VisionTransformerFamily


def softmax_form(attn: BeitAttention, shared_bias: torch.Tensor | None) -> PrunedAttention:
    """A :class:`PrunedAttention` that computes what BEiT's ``attn`` computes, with ``shared_bias`` folded in."""
    heads = attn.num_heads
    width = attn.qkv.out_features // 3
    dim = attn.qkv.in_features
    new = PrunedAttention(dim, heads, width // heads, width // heads, float(attn.scale), qkv_bias=attn.q_bias is not None,
                          proj_bias=attn.proj.bias is not None).to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
    with torch.no_grad():
        new.qkv.weight.copy_(attn.qkv.weight)
        if attn.q_bias is not None:
            new.qkv.bias.copy_(torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias)))
        new.proj = attn.proj
        bias = attn._get_rel_pos_bias()[0] if attn.relative_position_bias_table is not None else None
        if shared_bias is not None:
            bias = shared_bias.reshape(heads, *shared_bias.shape[-2:]) + (0 if bias is None else bias)
        if bias is not None:
            new.attn_bias = nn.Parameter(bias.detach().clone())
    return new.train(attn.training)


class BeitAttentionlessBlock(nn.Module):
    """A BEiT block whose every head was pruned: x + γ₁·b, then x + γ₂·mlp(norm2(x)).

    With every head masked, the attention branch adds γ₁ times proj's bias b, the same for every
    token (nothing without a bias); the branch itself is gone from the graph. See
    :class:`search.families.vit.AttentionlessBlock` for the ViT form.

    Args:
        block: the BEiT block it replaces (its MLP half is taken over as is).
        embed_dim: token width.
    """

    def __init__(self, block: BeitBlock, embed_dim: int) -> None:
        super().__init__()
        bias = block.attn.proj.bias
        self.attn_bias: nn.Parameter | None = None
        if bias is not None:
            with torch.no_grad():
                scaled = bias.detach() * (block.gamma_1.detach() if block.gamma_1 is not None else 1.0)
                self.attn_bias = nn.Parameter(scaled.clone())
        self.attn = RemovedAttention(embed_dim)
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.gamma_2 = block.gamma_2
        self.drop_path2 = block.drop_path2

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.attn_bias is not None:
            x = x + self.attn_bias
        branch = self.mlp(self.norm2(x))
        return x + self.drop_path2(branch if self.gamma_2 is None else self.gamma_2 * branch)


class BeitFamily(VisionTransformerFamily):
    """timm ``Beit`` models (BEiT, BEiT v2) with a plain ``Mlp``, their attention in the softmax kind's form."""

    name = "beit"
    supports = "timm's Beit (BEiT, BEiT v2) with a plain Mlp"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, Beit)

    def prepare(self, model: nn.Module) -> nn.Module:
        shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        for block in model.blocks:
            if isinstance(block.attn, BeitAttention):
                block.attn = softmax_form(block.attn, shared)
        model.rel_pos_bias = None  # folded into every block's bias
        return model

    def check(self, model: nn.Module) -> None:
        if not isinstance(model.patch_embed, PatchEmbed) or not isinstance(model.patch_embed.proj, nn.Conv2d):
            raise UnknownModelError(f"Beit embeds patches with a {type(model.patch_embed).__name__}; prune-export supports "
                                    "timm's PatchEmbed (one convolution)")
        for i, block in enumerate(model.blocks):
            if not isinstance(block, (BeitBlock, BeitAttentionlessBlock)):
                raise UnknownModelError(f"block {i} is a {type(block).__name__}; prune-export supports BEiT's Block")
            if isinstance(block.attn, BeitAttention):
                raise ValueError("BEiT's attention must be put in the softmax form first: load it through "
                                 "search.models.load (which calls search.families.prepare)")
            mlp = block.mlp
            if type(mlp) is not Mlp or "Norm" in type(getattr(mlp, "norm", nn.Identity())).__name__:
                raise UnknownModelError(
                    f"block {i} has a {type(mlp).__name__} MLP{' with a norm' if type(mlp) is Mlp else ''}; prune-export "
                    "supports timm's plain Mlp (fc1, act, fc2), not gated (SwiGLU) or normalised MLPs"
                )

    def drop_attention(self, model: nn.Module, index: int) -> nn.Module:
        block = model.blocks[index]
        if not isinstance(block, BeitAttentionlessBlock):
            block = BeitAttentionlessBlock(block, self.embed_dim(model)).train(block.training)
            model.blocks[index] = block
        return block

    def residual_scales(self, block: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        width = self.mlp_linears(block)[1].out_features

        def scale(gamma: torch.Tensor | None) -> torch.Tensor:
            return torch.ones(width) if gamma is None else gamma.detach().float()

        attn = None if isinstance(block, BeitAttentionlessBlock) else scale(block.gamma_1)
        return attn, scale(block.gamma_2)

    def layout(self, model: nn.Module) -> TokenLayout:
        return TokenLayout(prefix=1, grid=tuple(model.patch_embed.grid_size))

    def fixed_macs(self, model: nn.Module) -> int:
        conv, grid = model.patch_embed.proj, model.patch_embed.grid_size
        kh, kw = conv.kernel_size
        fixed = grid[0] * grid[1] * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
        return fixed + (model.head.in_features * model.head.out_features if isinstance(model.head, nn.Linear) else 0)


register_family(BeitFamily())
