"""timm's VisionTransformer (ViT, DeiT, DINOv2 and their FLatten variants).

Blocks are ``model.blocks``, each with ``attn`` and a plain timm ``Mlp`` (fc1, act, norm, fc2);
the tokens are the prefix tokens (class, registers) and the patch grid. The MLP's ``norm`` slot sits
between the activation and fc2, which is where the MLP reweight goes.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from search.attention.base import TokenLayout
from search.core.errors import UnknownModelError
from search.families.base import ModelFamily, register_family
from search.slicing import slice_linear


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
