"""Similarity-based weights: a channel that looks like others in its head is redundant.

For each channel we take its activations over all calibration tokens and measure the absolute
cosine similarity to the other channels of the same head (the other units of the same MLP). The
redundancy of a channel is the mean |cos| to its ``k`` most similar peers (our choice: k = 4; the mean
over *all* peers dilutes an exact duplicate to 1/(d-1) and lets noise hide it). The weight is
1 - redundancy, scaled to mean 1 within the group, and multiplies the indicator in the final ranking,
so a redundant channel goes first and a channel unlike the rest is kept.
"""
from __future__ import annotations

import torch

from search.methods.activations import BlockActivations
from search.methods.importance import BlockScores

TOP_K = 4


def redundancy(acts: torch.Tensor, top_k: int = TOP_K) -> torch.Tensor:
    """Mean |cosine| of each channel to its ``top_k`` most similar peers.

    Args:
        acts: (groups, samples, channels): channels are compared within each group (a head).

    Returns:
        (groups, channels) redundancy in [0, 1].
    """
    x = acts - acts.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = torch.einsum("gsc,gsd->gcd", x, x).abs()
    sim.diagonal(dim1=1, dim2=2).fill_(0.0)
    k = max(1, min(top_k, sim.shape[-1] - 1))
    return sim.topk(k, dim=-1).values.mean(-1)


def _weights(red: torch.Tensor) -> torch.Tensor:
    w = (1.0 - red).clamp_min(1e-3)
    return w / w.mean()


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, d) → (heads, batch·tokens, d)."""
    b, h, n, d = x.shape
    return x.permute(1, 0, 2, 3).reshape(h, b * n, d)


def similarity_weights(acts: BlockActivations) -> BlockScores:
    """Weights per (head, channel) for q/k and v and per MLP unit; mean 1 in every group."""
    qk = 0.5 * (redundancy(_per_head(acts.q)) + redundancy(_per_head(acts.k)))
    v = redundancy(_per_head(acts.v))
    hidden = acts.hidden.reshape(1, -1, acts.hidden.shape[-1])
    mlp = redundancy(hidden)[0]
    return BlockScores(qk=_weights(qk), v=_weights(v), mlp=_weights(mlp))
