"""timm's VisionTransformer (ViT, DeiT, DINOv2 and their FLatten variants).

Blocks are ``model.blocks``, each with ``attn`` and a plain timm ``Mlp`` (fc1, act, norm, fc2);
the tokens are the prefix tokens (class, registers) and the patch grid. The MLP's ``norm`` slot sits
between the activation and fc2, which is where the MLP reweight goes. A block that keeps no head
becomes an :class:`AttentionlessBlock` (residual, proj's bias, MLP branch), so its attention is not exported.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from search.attention import kind_of
from search.attention.base import TokenLayout
from search.attention.removed import RemovedAttention
from search.core.errors import UnknownModelError
from search.families.base import ModelFamily, register_family
from search.slicing import slice_linear


class AttentionlessBlock(nn.Module):
    """A timm ViT block whose every head was pruned: x + c + drop_path2(ls2(mlp(norm2(x)))).

    With every head masked to zero, the attention branch still adds ls1(proj's bias): a constant
    c per channel, which is all that is left of it. The branch (norm1, qkv, the token mixing, proj)
    is gone, not zeroed, so the exported graph computes none of it and adds c with one Add (none
    when proj has no bias); the block then equals the dense block with all its heads masked, as the
    search saw it. ``attn`` holds a :class:`RemovedAttention` marker for the geometry.

    Args:
        block: the timm block it replaces (its MLP half is taken over as is).
        embed_dim: token width.
    """

    def __init__(self, block: nn.Module, embed_dim: int) -> None:
        super().__init__()
        out = kind_of(block.attn).reweight_target(block.attn)  # the layer after the merged heads
        self.attn_bias: nn.Parameter | None = None
        if out.bias is not None:
            with torch.no_grad():
                self.attn_bias = nn.Parameter(block.ls1(out.bias.detach().clone()).clone())
        self.attn = RemovedAttention(embed_dim)
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.ls2 = block.ls2
        self.drop_path2 = block.drop_path2

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if self.attn_bias is not None:
            x = x + self.attn_bias
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformerFamily(ModelFamily):
    """timm ``VisionTransformer`` models with a plain ``Mlp`` in every block."""

    name = "vit"

    def matches(self, model: nn.Module) -> bool:
        return all(hasattr(model, attr) for attr in ("patch_embed", "blocks", "head"))

    def check(self, model: nn.Module) -> None:
        if getattr(model, "attn_pool", None) is not None:
            raise UnknownModelError("attention-pool heads are not supported; choose a ViT with token or avg pooling")
        for i, block in enumerate(model.blocks):
            mlp = getattr(block, "mlp", None)
            if mlp is None or not all(hasattr(mlp, f) for f in ("fc1", "fc2")) or type(mlp).__name__ != "Mlp":
                raise UnknownModelError(
                    f"block {i} has a {type(mlp).__name__} MLP; only timm's plain Mlp (fc1, act, fc2) is supported"
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
            block = AttentionlessBlock(block, int(model.embed_dim)).train(block.training)
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

    def fixed_macs(self, model: nn.Module) -> int:
        conv, grid = model.patch_embed.proj, model.patch_embed.grid_size
        kh, kw = conv.kernel_size
        fixed = grid[0] * grid[1] * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
        if isinstance(model.head, nn.Linear):
            fixed += model.head.in_features * model.head.out_features
        return fixed


register_family(VisionTransformerFamily())
