"""Attention-difference initialisation: start each indicator from what its channel alone does.

For every channel we measure how much the block's output changes when that channel alone is
removed, on a calibration batch. For the attention groups the block's attention kind does the
measuring (it knows its own formula; all channels of a layer in batched passes). For an MLP unit f
the change in fc2's output is a_f ⊗ fc2[:, f], of squared norm ‖a_f‖²·‖fc2[:, f]‖².

Differences become ranks within their group, mapped to logits in [LOW, HIGH]: every gate starts
near 1 (the dense model) and the least important start lowest.
"""
from __future__ import annotations

import torch
from torch import nn

from search.methods.activations import BlockActivations
from search.attention import kind_of, measurable
from search.families import family_of
from search.methods.importance import BlockScores

LOW, HIGH = 1.0, 4.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of ``x`` within the whole tensor, scaled to [0, 1]."""
    flat = x.flatten()
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.linspace(0.0, 1.0, flat.numel(), device=flat.device, dtype=flat.dtype)
    return ranks.reshape(x.shape)


def _logits(diff: torch.Tensor) -> torch.Tensor:
    return LOW + (HIGH - LOW) * _ranks(diff)


@torch.no_grad()
def attention_differences(model: nn.Module, index: int, acts: BlockActivations) -> BlockScores:
    """Raw output change per channel of block ``index`` (larger means the channel matters more)."""
    family = family_of(model)
    block = family.blocks(model)[index]
    attn = family.attention(block)
    qk, v = measurable(kind_of(attn), f"block {index}").attention_differences(attn, acts.attention)
    fc2 = family.mlp_linears(block)[1].weight.float().to(acts.hidden.device)
    mlp = acts.hidden.pow(2).sum(dim=(0, 1)) * fc2.pow(2).sum(0)
    return BlockScores(qk=qk, v=v, mlp=mlp)


def init_logits(model: nn.Module, activations: tuple[BlockActivations, ...]) -> tuple[BlockScores, ...]:
    """Initial gate logits for every block from the attention-difference measure."""
    result = []
    for i, acts in enumerate(activations):
        d = attention_differences(model, i, acts)
        result.append(BlockScores(qk=_logits(d.qk), v=_logits(d.v), mlp=_logits(d.mlp)))
    return tuple(result)
