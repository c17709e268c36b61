"""Analytic MAC count of a ViT at batch 1 and native resolution, per prunable group.

The count covers the patch embedding, the qkv projection, the attention's token-mixing products
(delegated to the attention kind), the output projection, the MLP and the classifier head: exactly
the MatMul/Gemm/Conv work an exported graph does. ``exporter.onnx_macs`` counts the same thing
independently from the ONNX graph, and the tests hold the two within 0.5%.

Every term is linear in each kept width, which is what lets the budget solver price a cut exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from search.attention_kinds import AttentionShape, get_kind, kind_of
from search.errors import UnknownModelError


@dataclass(frozen=True)
class BlockWidths:
    """Kept widths of one transformer block: heads, q/k and v channels per head, MLP units."""

    heads: int
    qk: int
    v: int
    mlp: int


@dataclass(frozen=True)
class BlockGeometry:
    """Dense shape of one block and the attention kind that prices its products."""

    kind: str
    attention: AttentionShape
    mlp_hidden: int

    @property
    def dense(self) -> BlockWidths:
        a = self.attention
        return BlockWidths(heads=a.num_heads, qk=a.qk_dim, v=a.v_dim, mlp=self.mlp_hidden)


@dataclass(frozen=True)
class ModelGeometry:
    """What the MAC count needs to know about a ViT.

    Attributes:
        tokens: sequence length N (patches plus class/register tokens).
        embed_dim: token width D, never pruned.
        fixed_macs: MACs that no plan changes (patch embedding and head).
        blocks: per-block dense geometry.
    """

    tokens: int
    embed_dim: int
    fixed_macs: int
    blocks: tuple[BlockGeometry, ...]

    def dense_widths(self) -> tuple[BlockWidths, ...]:
        return tuple(b.dense for b in self.blocks)


def block_macs(geometry: ModelGeometry, index: int, widths: BlockWidths) -> int:
    """MACs of block ``index`` at ``widths``: qkv, products, proj, fc1 and fc2."""
    n, d = geometry.tokens, geometry.embed_dim
    h = widths.heads
    qkv = n * d * h * (2 * widths.qk + widths.v)
    products = get_kind(geometry.blocks[index].kind).product_macs(n, h, widths.qk, widths.v)
    proj = n * h * widths.v * d
    mlp = 2 * n * d * widths.mlp
    return qkv + products + proj + mlp


def model_macs(geometry: ModelGeometry, widths: tuple[BlockWidths, ...] | None = None) -> int:
    """Total MACs at batch 1; ``widths=None`` counts the dense model."""
    widths = geometry.dense_widths() if widths is None else widths
    if len(widths) != len(geometry.blocks):
        raise ValueError(f"{len(widths)} block widths for {len(geometry.blocks)} blocks")
    return geometry.fixed_macs + sum(block_macs(geometry, i, w) for i, w in enumerate(widths))


def unit_macs(geometry: ModelGeometry, index: int, widths: BlockWidths, group: str) -> int:
    """MACs saved by removing one channel of ``group`` (in every kept head for qk and v)."""
    fewer = {group: getattr(widths, group) - 1}
    return block_macs(geometry, index, widths) - block_macs(geometry, index, replace(widths, **fewer))


def _conv_macs(conv: nn.Conv2d, grid: tuple[int, int]) -> int:
    kh, kw = conv.kernel_size
    return grid[0] * grid[1] * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


def describe(model: nn.Module) -> ModelGeometry:
    """Read the geometry of a timm VisionTransformer (dense or already pruned by surgery)."""
    for attr in ("patch_embed", "blocks", "head"):
        if not hasattr(model, attr):
            raise UnknownModelError(
                f"{type(model).__name__} is not a timm VisionTransformer (no .{attr}); "
                "use a ViT/DeiT model name"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise UnknownModelError("attention-pool heads are not supported; choose a ViT with token or avg pooling")
    pe = model.patch_embed
    grid = tuple(pe.grid_size)
    tokens = grid[0] * grid[1] + int(getattr(model, "num_prefix_tokens", 1))
    embed_dim = int(model.embed_dim)
    fixed = _conv_macs(pe.proj, grid)
    if isinstance(model.head, nn.Linear):
        fixed += model.head.in_features * model.head.out_features
    blocks = []
    for i, block in enumerate(model.blocks):
        mlp = getattr(block, "mlp", None)
        if mlp is None or not all(hasattr(mlp, f) for f in ("fc1", "fc2")) or type(mlp).__name__ != "Mlp":
            raise UnknownModelError(
                f"block {i} has a {type(mlp).__name__} MLP; only timm's plain Mlp (fc1, act, fc2) is supported"
            )
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise UnknownModelError(f"block {i} normalises its MLP hidden layer, which channel pruning would change")
        kind = kind_of(block.attn)
        blocks.append(
            BlockGeometry(kind=kind.name, attention=kind.shape(block.attn), mlp_hidden=mlp.fc1.out_features)
        )
    return ModelGeometry(tokens=tokens, embed_dim=embed_dim, fixed_macs=fixed, blocks=tuple(blocks))
