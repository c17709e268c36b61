"""Analytic MAC count of a model at batch 1 and native resolution, per prunable group.

The count covers the fixed parts (patch embedding, classifier head: the model family counts them),
every attention module (its kind counts all of it: projections, token-mixing products and any
extra op) and every MLP: exactly the MatMul/Gemm/Conv work an exported graph does.
``exporter.onnx_macs`` counts the same thing independently from the ONNX graph, and the tests hold
the two together.

Every term is linear in each kept width, which is what lets the budget solver price a cut exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from search.attention import AttentionShape, TokenLayout, get_kind, kind_of
from search.families import family_of, get_family
from search.cut.blocks import BlockWidths


@dataclass(frozen=True)
class BlockGeometry:
    """Dense shape of one block and the attention kind that prices it."""

    kind: str
    attention: AttentionShape
    mlp_hidden: int

    @property
    def dense(self) -> BlockWidths:
        a = self.attention
        return BlockWidths(heads=a.num_heads, qk=a.qk_dim, v=a.v_dim, mlp=self.mlp_hidden)


@dataclass(frozen=True)
class ModelGeometry:
    """What the MAC count, the gates and the solver need to know about a model.

    Attributes:
        family: the model family's registered name.
        layout: the tokens every block sees.
        embed_dim: token width D, never pruned.
        fixed_macs: MACs that no plan changes (patch embedding and head).
        blocks: per-block dense geometry.
    """

    family: str
    layout: TokenLayout
    embed_dim: int
    fixed_macs: int
    blocks: tuple[BlockGeometry, ...]

    @property
    def tokens(self) -> int:
        """Sequence length N (patches plus prefix tokens)."""
        return self.layout.tokens

    def dense_widths(self) -> tuple[BlockWidths, ...]:
        return tuple(b.dense for b in self.blocks)


def block_macs(geometry: ModelGeometry, index: int, widths: BlockWidths) -> int:
    """MACs of block ``index`` at ``widths``: its attention module (all of it) and its MLP."""
    g = geometry.blocks[index]
    attention = get_kind(g.kind).macs(g.attention, widths.heads, widths.qk, widths.v, geometry.layout)
    return attention + get_family(geometry.family).mlp_macs(geometry.embed_dim, widths.mlp, geometry.layout)


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


def describe(model: nn.Module) -> ModelGeometry:
    """Read the geometry of a model (dense or already pruned by surgery) through its family and kinds."""
    family = family_of(model)
    blocks = []
    for block in family.blocks(model):
        attn = family.attention(block)
        kind = kind_of(attn)
        blocks.append(BlockGeometry(kind=kind.name, attention=kind.shape(attn), mlp_hidden=family.mlp_linears(block)[0].out_features))
    return ModelGeometry(
        family=family.name, layout=family.layout(model), embed_dim=family.embed_dim(model),
        fixed_macs=family.fixed_macs(model), blocks=tuple(blocks),
    )


def parameter_count(model: nn.Module) -> int:
    """Every parameter of ``model``, counted once: the size figure reports and benches give beside the MACs."""
    return sum(p.numel() for p in model.parameters())
