"""Attention-difference initialisation: start each indicator from what its channel alone does.

For every channel we measure how much the block's attention output (after proj) changes when that
channel alone is removed, on a calibration batch:

- q/k channel j of head h: the scores lose the rank-one term scale·q_j k_jᵀ, so the change is
  (softmax(S - scale·q_j k_jᵀ) - softmax(S)) V_h projected by head h's proj columns. All channels of
  a head are evaluated in one batched pass (chunked only to bound memory).
- v channel j of head h: output channel j of head h vanishes, so the change is
  O_hj ⊗ proj[:, h, j]; its norm is ‖O_hj‖·‖proj[:, h, j]‖, exactly.
- MLP unit f: the change in fc2's output is a_f ⊗ fc2[:, f], norm ‖a_f‖·‖fc2[:, f]‖.

The same measure applies to any attention kind that exposes q, k, v and proj per head; softmax is
implemented here. Differences become ranks within their group, mapped to logits in
[LOW, HIGH]: every gate starts near 1 (the dense model) and the least important start lowest.
"""
from __future__ import annotations

import torch
from torch import nn

from search.activations import BlockActivations
from search.attention_kinds import kind_of
from search.importance import BlockScores

LOW, HIGH = 1.0, 4.0
CHUNK_BYTES = 256 * 2**20


def _qk_differences(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: torch.Tensor, scale: float) -> torch.Tensor:
    """(heads, qk_dim) squared change of the projected output when one q/k channel is removed.

    Args:
        q, k: (batch, heads, tokens, qk_dim); v: (batch, heads, tokens, v_dim).
        proj: (embed_dim, heads, v_dim) columns of the output projection.
    """
    b, h, n, d = q.shape
    scores = scale * q @ k.transpose(-1, -2)
    base = scores.softmax(-1) @ v
    out = torch.empty(h, d, device=q.device)
    per_channel = b * n * n * 4 * 3
    chunk = max(1, CHUNK_BYTES // per_channel)
    for head in range(h):
        qh, kh, vh, base_h = q[:, head], k[:, head], v[:, head], base[:, head]
        w = proj[:, head, :]
        for start in range(0, d, chunk):
            js = torch.arange(start, min(d, start + chunk), device=q.device)
            rank_one = scale * qh[..., js].permute(2, 0, 1).unsqueeze(-1) * kh[..., js].permute(2, 0, 1).unsqueeze(-2)
            removed = (scores[:, head].unsqueeze(0) - rank_one).softmax(-1) @ vh.unsqueeze(0)
            change = (removed - base_h.unsqueeze(0)) @ w.T
            out[head, js] = change.pow(2).sum(dim=(1, 2, 3))
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of ``x`` within the whole tensor, scaled to [0, 1]."""
    flat = x.flatten()
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.linspace(0.0, 1.0, flat.numel(), device=flat.device, dtype=flat.dtype)
    return ranks.reshape(x.shape)


def _logits(diff: torch.Tensor) -> torch.Tensor:
    return LOW + (HIGH - LOW) * _ranks(diff)


@torch.no_grad()
def attention_differences(block: nn.Module, acts: BlockActivations) -> BlockScores:
    """Raw output change per channel of one block (larger means the channel matters more)."""
    attn = block.attn
    w = kind_of(attn).head_weights(attn)
    proj = w.proj.float().to(acts.q.device)
    qk = _qk_differences(acts.q, acts.k, acts.v, proj, float(attn.scale))
    scores = float(attn.scale) * acts.q @ acts.k.transpose(-1, -2)
    out = scores.softmax(-1) @ acts.v
    v = out.pow(2).sum(dim=(0, 2)) * proj.pow(2).sum(0)
    fc2 = block.mlp.fc2.weight.float().to(acts.hidden.device)
    mlp = acts.hidden.pow(2).sum(dim=(0, 1)) * fc2.pow(2).sum(0)
    return BlockScores(qk=qk, v=v, mlp=mlp)


def init_logits(model: nn.Module, activations: tuple[BlockActivations, ...]) -> tuple[BlockScores, ...]:
    """Initial gate logits for every block from the attention-difference measure."""
    result = []
    for block, acts in zip(model.blocks, activations):
        d = attention_differences(block, acts)
        result.append(BlockScores(qk=_logits(d.qk), v=_logits(d.v), mlp=_logits(d.mlp)))
    return tuple(result)
