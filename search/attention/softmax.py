"""Softmax attention: timm's ``Attention`` and its pruned form, ``PrunedAttention``.

- **Shape.** heads H, q/k width d_qk and v width d_v per head; a fused qkv Linear [q | k | v].
- **MACs.** qkv N·D·H·(2·d_qk + d_v), q·kᵀ H·N²·d_qk, attn·v H·N²·d_v, proj N·H·d_v·D.
- **Gates.** q/k channel j of head h acts on q only: q·k sums over j, so scaling q_j scales exactly
  the term that removing channel j deletes (gating k as well would square the gate). v channel j
  of head h scales that head's output channel j. Both are applied to the qkv output by one hook.
- **Attention difference.** Removing q/k channel j of head h removes the rank-one term
  scale·q_j k_jᵀ from the scores: the change is (softmax(S - scale·q_j k_jᵀ) - softmax(S)) V_h
  projected by head h's proj columns, all channels of a head in one batched pass (chunked to bound
  memory). Removing v channel j zeroes output channel j of head h: the change is O_hj ⊗ proj[:, h, j],
  whose squared norm is ‖O_hj‖²·‖proj[:, h, j]‖², exactly.
- **Score bias.** A ``PrunedAttention`` may carry a bias on each head's scores (BEiT's relative
  position bias; the BEiT family turns BEiT's attention into this form). No MAC is counted for it
  (an Add), removing a channel leaves it, and a kept head keeps its bias.
- **Slicing.** Keeps the plan's heads, their q/k rows and v rows, and proj's matching columns.
  The softmax scale stays the dense one: the trained weights expect 1/√(dense head_dim), while
  timm's Attention would derive a new scale from the smaller head width.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn
from torch.utils.hooks import RemovableHandle

from search.attention.base import (
    AttentionActivations,
    AttentionShape,
    GateValues,
    HeadWeights,
    MeasurableKind,
    TokenLayout,
    head_rows,
    register_kind,
    split_fused_qkv,
)
from search.core.errors import UnknownModelError
from search.cut.least_squares import NormalEquations, load_fit, prior_of, ridge_solve
from search.cut.selection import keep_least_loss
from search.cut.slicing import slice_linear

if TYPE_CHECKING:
    from search.cut.blocks import BlockPlan

CHUNK_BYTES = 256 * 2**20
FIT_CHUNK = 16
"""Images per batch when the logit fit runs the q/k projections over the calibration inputs."""
KEY_RIDGE = 1e-6
"""Ridge of the regression of the dense keys on the kept ones: a guard against a singular Gram, no more."""


class PrunedAttention(nn.Module):
    """Multi-head softmax attention: softmax(q kᵀ · scale + bias) v, heads of qk_dim and v_dim channels.

    ``reweight`` (identity unless recovery adds one) acts on the attention output right before
    ``proj``, so it folds exactly into proj's weights before export. ``attn_bias`` (None, or a
    (heads, tokens, tokens) parameter) is a bias on the attention scores of each head: BEiT's
    relative position bias, gathered from its table for the model's one token grid.

    Args:
        dim: token width in and out.
        num_heads: number of heads.
        qk_dim: q/k channels per head.
        v_dim: v channels per head.
        scale: softmax scale, kept from the dense model.
        qkv_bias: whether the fused qkv projection has a bias.
        proj_bias: whether the output projection has a bias.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float, qkv_bias: bool = True,
                 proj_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.head_dim = qk_dim
        self.scale = scale
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.reweight: nn.Module = nn.Identity()
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias)
        self.attn_bias: nn.Parameter | None = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).split([h * self.qk_dim, h * self.qk_dim, h * self.v_dim], dim=-1)
        q = q.reshape(b, n, h, self.qk_dim).transpose(1, 2)
        k = k.reshape(b, n, h, self.qk_dim).transpose(1, 2)
        v = v.reshape(b, n, h, self.v_dim).transpose(1, 2)
        for bias in (self.attn_bias, shared_rel_pos_bias):  # BEiT's blocks pass a shared bias (None once prepared)
            if bias is not None:
                attn_mask = bias if attn_mask is None else attn_mask + bias
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(self.reweight(x.transpose(1, 2).reshape(b, n, h * self.v_dim)))


def _keep_jointly(keys: list[NormalEquations], fits: list[torch.Tensor], queries: torch.Tensor, keep: int,
                  ridge: float) -> list[int]:
    """The ``keep`` channels, the same in every head, that lose least over all heads: one system with the heads'
    Gram matrices, fits and query moments on the diagonal, a group per channel holding it in every head."""
    heads, d = len(keys), queries.shape[-1]
    gram = torch.block_diag(*[eq.gram.cpu() for eq in keys])
    fit = torch.block_diag(*fits)
    metric = torch.block_diag(*queries)
    groups = [[h * (d + 1) + j for h in range(heads)] for j in range(d)]
    return keep_least_loss(gram, fit, keep, groups, metric, ridge)


def _split_heads(qkv: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, tokens, fused) → q, k (batch, heads, tokens, qk_dim) and v (batch, heads, tokens, v_dim)."""
    h, dqk, dv = shape.num_heads, shape.qk_dim, shape.v_dim
    b, n, _ = qkv.shape
    q, k, v = qkv.split([h * dqk, h * dqk, h * dv], dim=-1)
    return (q.reshape(b, n, h, dqk).transpose(1, 2), k.reshape(b, n, h, dqk).transpose(1, 2),
            v.reshape(b, n, h, dv).transpose(1, 2))


def qk_differences(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: torch.Tensor, scale: float,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """(heads, qk_dim) squared change of the projected output when one q/k channel is removed.

    Args:
        q, k: (batch, heads, tokens, qk_dim); v: (batch, heads, tokens, v_dim).
        proj: (embed_dim, heads, v_dim) columns of the output projection.
        bias: (heads, tokens, tokens) bias on the scores, or None; removing a channel leaves it.
    """
    b, h, n, d = q.shape
    scores = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias
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


class SoftmaxAttentionKind(MeasurableKind):
    """softmax(q kᵀ·scale) v: timm's ``Attention`` and prune-export's ``PrunedAttention``."""

    name = "softmax"
    supports = "timm's Attention (softmax)"

    def matches(self, module: nn.Module) -> bool:
        # By class, not by name: other models' attention classes are also called Attention (BEiT's
        # adds a relative position bias and separate q/v biases) and are not this kind.
        return isinstance(module, (Attention, PrunedAttention))

    def shape(self, module: nn.Module) -> AttentionShape:
        for part in ("q_norm", "k_norm", "norm"):
            sub = getattr(module, part, None)
            if sub is not None and not isinstance(sub, nn.Identity):
                raise UnknownModelError(
                    f"attention with {part} normalisation cannot be pruned channel-wise; "
                    "choose a ViT/DeiT without qk_norm or scale_norm"
                )
        if getattr(module, "gate", None) is not None:
            raise UnknownModelError("gated attention is not supported; choose a ViT/DeiT without it")
        heads = module.num_heads
        qk = getattr(module, "qk_dim", None) or module.head_dim
        v = getattr(module, "v_dim", None) or module.head_dim
        return AttentionShape(embed_dim=module.qkv.in_features, num_heads=heads, qk_dim=qk, v_dim=v)

    def macs(self, shape: AttentionShape, heads: int, qk: int, v: int, layout: TokenLayout) -> int:
        n, d = layout.tokens, shape.embed_dim
        return n * d * heads * (2 * qk + v) + heads * n * n * (qk + v) + n * heads * v * d

    def head_weights(self, module: nn.Module) -> HeadWeights:
        s = self.shape(module)
        q, k, v = split_fused_qkv(module.qkv.weight, s.num_heads, s.qk_dim, s.v_dim)
        proj = module.proj.weight.reshape(module.proj.out_features, s.num_heads, s.v_dim)
        return HeadWeights(q=q, k=k, v=v, proj=proj)

    def gate(self, module: nn.Module, values: GateValues) -> list[RemovableHandle]:
        s = self.shape(module)

        def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            qk, v = values()
            ones = torch.ones(s.num_heads * s.qk_dim, dtype=out.dtype, device=out.device)
            return out * torch.cat([qk.reshape(-1).to(out.dtype), ones, v.reshape(-1).to(out.dtype)])

        return [module.qkv.register_forward_hook(hook)]

    def capture(self, module: nn.Module, sink: Callable[[AttentionActivations], None]) -> list[RemovableHandle]:
        s = self.shape(module)

        def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
            q, k, v = _split_heads(out.detach().float(), s)
            sink(AttentionActivations(q=q, k=k, v=v))

        return [module.qkv.register_forward_hook(hook)]

    def attention_differences(self, module: nn.Module, acts: AttentionActivations) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.head_weights(module).proj.float().to(acts.q.device)
        scale = float(module.scale)
        bias = getattr(module, "attn_bias", None)
        bias = None if bias is None else bias.detach().float().to(acts.q.device)
        qk = qk_differences(acts.q, acts.k, acts.v, proj, scale, bias)
        scores = scale * acts.q @ acts.k.transpose(-1, -2)
        out = (scores if bias is None else scores + bias).softmax(-1) @ acts.v
        v = out.pow(2).sum(dim=(0, 2)) * proj.pow(2).sum(0)
        return qk, v

    @torch.no_grad()
    def fit_logits(self, dense: nn.Module, pruned: nn.Module, plan: BlockPlan, dense_inputs: torch.Tensor,
                   pruned_inputs: torch.Tensor, ridge: float) -> bool:
        """Refit the kept q rows of ``pruned.qkv`` so that q'·k' reproduces the dense q·k (the scores before softmax).

        Two least-squares fits per block:
        1. each kept head's dense keys as an affine map of its kept keys, k ≈ A k' + c, pooled over
           tokens and images (its intercept adds q·c to every score of a query alike, which softmax
           ignores). Then q·k ≈ (Aᵀq)·k', so Aᵀq is the best query for the kept keys;
        2. the kept q rows refitted by ridge (toward the sliced dense rows) to give Aᵀq_dense from
           the inputs the pruned block now sees, each q channel weighted by the mean square of its key.
        The softmax scale, the score bias and k are left as they are; v is left to the output layer's fit.
        """
        sd, sp = self.shape(dense), self.shape(pruned)
        if sp.num_heads == 0:
            return False
        chunks = list(zip(dense_inputs.split(FIT_CHUNK), pruned_inputs.split(FIT_CHUNK)))
        heads = list(plan.heads)

        def queries_keys(module: nn.Module, shape: AttentionShape, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q, k, _ = _split_heads(module.qkv(x.to(module.qkv.weight.dtype)).float(), shape)
            return q, k

        keys = [NormalEquations(sp.qk_dim, sd.qk_dim) for _ in heads]
        for xd, xp in chunks:
            _, kd = queries_keys(dense, sd, xd)
            _, kp = queries_keys(pruned, sp, xp)
            for i, h in enumerate(heads):
                keys[i].add(kp[:, i], kd[:, h])
        maps = []
        for i, eq in enumerate(keys):
            select = torch.zeros(sd.qk_dim, sp.qk_dim + 1, dtype=torch.float64)
            select[list(plan.qk[i]), torch.arange(sp.qk_dim)] = 1.0  # the cut itself: kept channel j is dense channel qk[i][j]
            maps.append(ridge_solve(eq, select, KEY_RIDGE)[:, :-1].float())
        fit = NormalEquations(sp.embed_dim, sp.num_heads * sp.qk_dim)
        key_power = torch.zeros(sp.num_heads * sp.qk_dim, dtype=torch.float64)
        for xd, xp in chunks:
            qd, _ = queries_keys(dense, sd, xd)
            _, kp = queries_keys(pruned, sp, xp)
            best = torch.stack([qd[:, h] @ maps[i].to(qd.device) for i, h in enumerate(heads)], dim=2)  # (b, n, h', d')
            fit.add(xp, best.reshape(*best.shape[:2], -1))
            key_power += kp.pow(2).sum(dim=(0, 2)).reshape(-1).double().cpu()
        rows = slice(0, sp.num_heads * sp.qk_dim)
        fitted = ridge_solve(fit, prior_of(pruned.qkv)[rows], ridge, row_weights=key_power.clamp_min(1e-12),
                             bias=pruned.qkv.bias is not None)
        load_fit(pruned.qkv, fitted, rows)
        return True

    @torch.no_grad()
    def choose_qk(self, dense: nn.Module, plan: BlockPlan, dense_inputs: torch.Tensor, pruned_inputs: torch.Tensor,
                  ridge: float) -> tuple[tuple[int, ...], ...] | None:
        """The q/k channels whose removal the logit fit repairs best (``search.cut.selection``).

        Per kept head, the dense keys k are regressed on all of the dense model's keys as the pruned block's
        inputs give them (k̃); removing channels of k̃ and refitting the rest leaves a key residual r, and
        the logits err by q·r, whose mean square is tr(Σ_q Σ_r) with Σ_q the dense queries' second
        moment. That is the loss :func:`~search.cut.selection.keep_least_loss` minimises, with the
        heads side by side and a channel removed from every head at once when the plan shares indices.
        """
        sd = self.shape(dense)
        if not plan.heads or len(plan.qk[0]) >= sd.qk_dim:
            return None
        heads, d = list(plan.heads), sd.qk_dim
        keys = [NormalEquations(d, d) for _ in heads]
        queries = torch.zeros(len(heads), d, d, dtype=torch.float64)
        for xd, xp in zip(dense_inputs.split(FIT_CHUNK), pruned_inputs.split(FIT_CHUNK)):
            qd, kd, _ = _split_heads(dense.qkv(xd.to(dense.qkv.weight.dtype)).float(), sd)
            _, kp, _ = _split_heads(dense.qkv(xp.to(dense.qkv.weight.dtype)).float(), sd)
            for i, h in enumerate(heads):
                keys[i].add(kp[:, h], kd[:, h])
                flat = qd[:, h].reshape(-1, d)
                queries[i] += (flat.T @ flat).double().cpu()
        identity = torch.cat([torch.eye(d, dtype=torch.float64), torch.zeros(d, 1, dtype=torch.float64)], dim=1)
        fits = [ridge_solve(eq, identity, KEY_RIDGE) for eq in keys]
        if plan.shared_indices:
            return (tuple(_keep_jointly(keys, fits, queries, len(plan.qk[0]), ridge)),) * len(heads)
        return tuple(tuple(keep_least_loss(eq.gram, fit, len(plan.qk[0]), [[j] for j in range(d)], q, ridge))
                     for eq, fit, q in zip(keys, fits, queries))

    def slice(self, module: nn.Module, plan: BlockPlan) -> PrunedAttention:
        shape = self.shape(module)
        h, dqk, dv = shape.num_heads, shape.qk_dim, shape.v_dim
        q_rows = head_rows(0, dqk, plan.heads, plan.qk)
        k_rows = head_rows(h * dqk, dqk, plan.heads, plan.qk)
        v_rows = head_rows(2 * h * dqk, dv, plan.heads, plan.v)
        widths = plan.widths
        new = PrunedAttention(
            dim=shape.embed_dim, num_heads=widths.heads, qk_dim=widths.qk, v_dim=widths.v, scale=float(module.scale),
            qkv_bias=module.qkv.bias is not None, proj_bias=module.proj.bias is not None,
        )
        new.qkv = slice_linear(module.qkv, out_idx=q_rows + k_rows + v_rows)
        new.proj = slice_linear(module.proj, in_idx=head_rows(0, dv, plan.heads, plan.v))
        bias = getattr(module, "attn_bias", None)
        if bias is not None:
            new.attn_bias = nn.Parameter(bias.detach()[list(plan.heads)].clone())
        return new.train(module.training)


register_kind(SoftmaxAttentionKind())
