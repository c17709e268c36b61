"""timm's VisionTransformer (ViT, DeiT, DeiT-III, DINOv2, CLIP, SigLIP, FlexiViT and the FLatten variants).

Blocks are ``model.blocks``, each a timm ``Block`` (pre-norm) or ``ResPostBlock`` (norm after each
branch) with ``attn`` and a plain timm ``Mlp`` (fc1, act, norm, fc2); the tokens are the prefix
tokens (class, distillation, registers) and the patch grid. The MLP's ``norm`` slot sits between
the activation and fc2, which is where the MLP reweight goes. A block that keeps no head becomes an
:class:`AttentionlessBlock` (residual, proj's bias, MLP branch), so its attention is not exported.
An attention-pool head (SigLIP's ``AttentionPoolLatent``) is left dense and counted with the fixed
MACs. Membership is by class (``VisionTransformer`` and its subclasses), so a model that merely has
``blocks`` and a ``head`` (EVA, CaiT; BEiT has its own family) is refused, naming its class, rather than taken for one.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from timm.layers import AttentionPoolLatent, Mlp, PatchEmbed
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from search.attention import kind_of
from search.attention.base import TokenLayout
from search.attention.removed import RemovedAttention
from search.core.errors import UnknownModelError
from search.families.base import ModelFamily, PatchInput, register_family
from search.cut.slicing import slice_linear


class AttentionlessBlock(nn.Module):
    """A timm ViT block whose every head was pruned: what is left of the attention branch, then the MLP branch.

    With every head masked to zero, the attention's output is proj's bias b (0 without one), the
    same for every token, so the whole attention branch adds one constant c per channel: ls1(b)
    for a pre-norm :class:`Block`, norm1(b) for a :class:`ResPostBlock` (which normalises the
    branch after the attention). The branch (norm, qkv, the token mixing, proj) is gone, not
    zeroed, so the exported graph computes none of it and adds c with one Add (none when a
    pre-norm block's proj has no bias); the block then equals the dense block with all its heads
    masked, as the search saw it. ``attn`` holds a :class:`RemovedAttention` marker for the geometry.

    Args:
        block: the timm block it replaces (its MLP half is taken over as is).
        embed_dim: token width.
    """

    def __init__(self, block: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.post_norm = isinstance(block, ResPostBlock)
        out = kind_of(block.attn).reweight_target(block.attn)  # the layer after the merged heads
        if out is None:
            raise ValueError(f"{type(block.attn).__name__} has no output layer: its block has no attention branch to drop")
        self.attn_bias: nn.Parameter | None = None
        if out.bias is not None or self.post_norm:
            bias = out.bias.detach().clone() if out.bias is not None else out.weight.new_zeros(out.out_features)
            with torch.no_grad():
                branch = block.norm1 if self.post_norm else block.ls1
                self.attn_bias = nn.Parameter(branch(bias).clone())
        self.attn = RemovedAttention(embed_dim)
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.ls2 = nn.Identity() if self.post_norm else block.ls2
        self.drop_path2 = block.drop_path2

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if self.attn_bias is not None:
            x = x + self.attn_bias
        if self.post_norm:
            return x + self.drop_path2(self.norm2(self.mlp(x)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


SUPPORTED_BLOCKS = (Block, ResPostBlock, AttentionlessBlock)
"""Blocks that run attention, then the MLP, each on the residual (pre-norm, or norm after the branch)."""


class VisionTransformerFamily(ModelFamily):
    """timm ``VisionTransformer`` models (and subclasses such as DeiT's distilled one) with sequential blocks and a plain ``Mlp``."""

    name = "vit"
    supports = ("timm's VisionTransformer (ViT, DeiT, DeiT-III, DINOv2, CLIP, SigLIP, FlexiViT) with Block or "
                "ResPostBlock blocks and a plain Mlp")

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def check(self, model: nn.Module) -> None:
        embed = model.patch_embed
        if not isinstance(embed, PatchEmbed) or not isinstance(getattr(embed, "proj", None), nn.Conv2d):
            raise UnknownModelError(
                f"{type(model).__name__} embeds patches with a {type(embed).__name__}; prune-export supports timm's "
                "PatchEmbed (one convolution), not a CNN stem"
            )
        pool = getattr(model, "attn_pool", None)
        if pool is not None and not isinstance(pool, AttentionPoolLatent):
            raise UnknownModelError(
                f"{type(model).__name__} pools with a {type(pool).__name__}; prune-export supports token or average "
                "pooling and timm's AttentionPoolLatent (left dense)"
            )
        for i, block in enumerate(model.blocks):
            if not isinstance(block, SUPPORTED_BLOCKS):
                raise UnknownModelError(
                    f"block {i} is a {type(block).__name__}; prune-export supports timm's Block and ResPostBlock "
                    "(attention, then MLP), not parallel or fused branches"
                )
            mlp = block.mlp
            if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
                raise UnknownModelError(
                    f"block {i} has a {type(mlp).__name__} MLP; prune-export supports timm's plain Mlp (fc1, act, fc2), "
                    "not gated (GLU, SwiGLU) or convolutional MLPs"
                )
            # The norm slot holds an identity, or a reweight during recovery; a normalisation there
            # would change when hidden units are cut.
            if "Norm" in type(getattr(mlp, "norm", nn.Identity())).__name__:
                raise UnknownModelError(f"block {i} normalises its MLP hidden layer, which channel pruning would change")

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.blocks

    def attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def set_attention(self, block: nn.Module, module: nn.Module) -> None:
        block.attn = module

    def drop_attention(self, model: nn.Module, index: int) -> nn.Module:
        block = model.blocks[index]
        if not isinstance(block, AttentionlessBlock):
            block = AttentionlessBlock(block, self.embed_dim(model)).train(block.training)
            model.blocks[index] = block
        return block

    def mlp_linears(self, block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        return block.mlp.fc1, block.mlp.fc2

    def mlp_activation(self, block: nn.Module) -> nn.Module:
        return block.mlp.act

    def slice_mlp(self, block: nn.Module, units: Sequence[int]) -> None:
        block.mlp.fc1 = slice_linear(block.mlp.fc1, out_idx=units)
        block.mlp.fc2 = slice_linear(block.mlp.fc2, in_idx=units)

    def set_mlp_reweight(self, block: nn.Module, module: nn.Module) -> None:
        block.mlp.norm = module

    def mlp_reweight(self, block: nn.Module) -> nn.Module:
        return getattr(block.mlp, "norm", nn.Identity())

    def residual_scales(self, block: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if isinstance(block, ResPostBlock) or getattr(block, "post_norm", False):
            return None, None
        width = self.mlp_linears(block)[1].out_features
        attn = None if isinstance(block, AttentionlessBlock) else layer_scale(block.ls1, width)
        return attn, layer_scale(block.ls2, width)

    def keep_blocks(self, model: nn.Module, indices: Sequence[int]) -> nn.Module:
        blocks = model.blocks
        model.blocks = nn.Sequential()
        try:
            part = copy.deepcopy(model)
        finally:
            model.blocks = blocks
        part.blocks = nn.Sequential(*(copy.deepcopy(blocks[i]) for i in indices))
        return part

    def layout(self, model: nn.Module) -> TokenLayout:
        return TokenLayout(prefix=int(getattr(model, "num_prefix_tokens", 1)), grid=tuple(model.patch_embed.grid_size))

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.embed_dim)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        embed = model.patch_embed
        rows, cols = (int(s) for s in embed.img_size)
        return int(embed.proj.in_channels), rows, cols

    def patch_input(self, model: nn.Module) -> PatchInput:
        embed = model.patch_embed
        patch = embed.patch_size
        return PatchInput(patch=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
                          pads=bool(getattr(embed, "dynamic_img_pad", False)), strict=bool(getattr(embed, "strict_img_size", True)))

    def embedding_layers(self, model: nn.Module) -> list[nn.Module]:
        return [model.patch_embed.proj] + ([model.head] if isinstance(model.head, nn.Linear) else [])

    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.forward_features(images)  # every token after the final norm, before pooling and the head

    def classes(self, model: nn.Module) -> int:
        return int(getattr(model, "num_classes", 0))

    def fixed_macs(self, model: nn.Module) -> int:
        conv, grid = model.patch_embed.proj, model.patch_embed.grid_size
        kh, kw = conv.kernel_size
        fixed = grid[0] * grid[1] * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
        for head in (model.head, getattr(model, "head_dist", None)):  # DeiT's distilled models have two
            if isinstance(head, nn.Linear):
                fixed += head.in_features * head.out_features
        pool = getattr(model, "attn_pool", None)
        if pool is not None:
            layout = self.layout(model)
            fixed += attention_pool_macs(pool, layout.tokens if model.pool_include_prefix else layout.patches)
        return fixed


def layer_scale(module: nn.Module, width: int) -> torch.Tensor | None:
    """The per-channel scale a LayerScale slot applies (ones for an identity); None for anything else."""
    if isinstance(module, nn.Identity):
        return torch.ones(width)
    gamma = getattr(module, "gamma", None)
    return gamma.detach().float() if isinstance(gamma, torch.Tensor) and gamma.shape == (width,) else None


def attention_pool_macs(pool: AttentionPoolLatent, tokens: int) -> int:
    """MACs at batch 1 of timm's latent-query attention pool over ``tokens`` tokens (never pruned).

    Its latent queries (L of them) are projected by ``q``, the tokens by ``kv``; q·kᵀ and
    attention·v cost L·N·D each; then ``proj`` and a plain MLP on the L pooled tokens.
    """
    latents, width = pool.latent_len, pool.kv.in_features
    macs = tokens * width * pool.kv.out_features + 2 * latents * tokens * pool.num_heads * pool.head_dim
    linears = [pool.q, pool.proj] + ([pool.mlp.fc1, pool.mlp.fc2] if pool.mlp is not None else [])
    return macs + sum(latents * layer.in_features * layer.out_features for layer in linears if isinstance(layer, nn.Linear))


register_family(VisionTransformerFamily())
