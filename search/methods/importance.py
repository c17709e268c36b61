"""Importance scores: how much each (head, channel) and each MLP unit matters.

Scores are kept apart from width allocation and from slicing (as in Torch-Pruning): a method only
produces a ``BlockScores`` per block, and ``search.budget.allocate`` turns scores into a Plan. Higher means
more important. Scores need not be comparable across blocks; the allocator normalises them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from search.attention import kind_of, measurable
from search.families import family_of
from search.budget.macs import ModelGeometry


@dataclass(frozen=True)
class BlockScores:
    """Importance of one block's prunable channels.

    Attributes:
        qk: (heads, qk_dim) score of channel j of head h's q and k together.
        v: (heads, v_dim) score of channel j of head h's v and the matching proj column.
        mlp: (mlp_hidden,) score of each hidden unit.
    """

    qk: torch.Tensor
    v: torch.Tensor
    mlp: torch.Tensor


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> tuple[BlockScores, ...]:
    """Squared L2 norm of every weight a channel owns.

    A q/k channel owns its q row and k row, a v channel its v row and its proj column, an MLP unit
    its fc1 row and fc2 column. Squared norms add, so summing over heads gives the L2 importance
    of the same index in every head.
    """
    scores = []
    family = family_of(model)
    for block in family.blocks(model):
        attn = family.attention(block)
        w = measurable(kind_of(attn)).head_weights(attn)
        qk = w.q.float().pow(2).sum(-1) + w.k.float().pow(2).sum(-1)
        v = w.v.float().pow(2).sum(-1) + w.proj.float().pow(2).sum(0)
        fc1, fc2 = (linear.weight.float() for linear in family.mlp_linears(block))
        mlp = fc1.pow(2).sum(1) + fc2.pow(2).sum(0)
        scores.append(BlockScores(qk=qk, v=v, mlp=mlp))
    return tuple(scores)


def random_scores(geometry: ModelGeometry, seed: int) -> tuple[BlockScores, ...]:
    """Uniform random scores: the baseline any real importance must beat."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        BlockScores(
            qk=torch.rand(g.attention.num_heads, g.attention.qk_dim, generator=gen),
            v=torch.rand(g.attention.num_heads, g.attention.v_dim, generator=gen),
            mlp=torch.rand(g.mlp_hidden, generator=gen),
        )
        for g in geometry.blocks
    )
