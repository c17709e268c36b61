"""Focused linear attention (FLatten): the kind for :class:`search.models.flatten.attention.FocusedLinearAttention`.

- **Shape.** As softmax, plus the side of the depthwise conv (DWC) that runs on v over the patch grid.
- **MACs.** qkv N·D·H·(2·d_qk + d_v); per head kᵀv and q·(kᵀv), N·d_qk·d_v each; the normaliser
  q·mean(k)ᵀ, N·d_qk; the DWC, shared by the heads but run on each head's v, H·patches·d_v·k²;
  proj N·H·d_v·D. The kᵀv terms are products of the two widths: linear in each of them, which is
  all the budget solver needs.
- **Removing a q/k channel** deletes it from q and from k (after the positional encoding) before
  the focusing map, and from ``scale`` and the positional encoding: φ is then taken over the
  remaining channels, so the norms inside φ change for every kept channel of every head. Surgery
  implements exactly this, and the gates approximate it: a q/k gate multiplies q and k at the
  focusing map's input, and at 0 the channel's share of φ's norms is (1e-6)², nothing.
- **Removing a v channel** deletes it from v, from the DWC and from proj's input columns, the same
  index in every head because the DWC is shared by all heads. Its gate scales proj's input,
  which is exactly that removal. ``--per-head-indices`` is refused for this kind: a per-head choice
  would need one DWC per head, a different architecture from the one that was trained.
- **Attention difference.** For q/k channel c (one of H·d_qk), the focusing map is recomputed with
  c deleted and the whole layer's linear attention re-run, for all channels of a layer in batched
  chunks: exact for one removed channel (the DWC does not see q or k). For v channel j of head h, the
  change is O_hj ⊗ proj[:, h, j], of squared norm ‖O_hj‖²·‖proj[:, h, j]‖², exactly.
- **Reweights** fold into proj, never into q: φ is not linear, so nothing in front of it folds.
- **Removing a head** deletes its q/k channels before φ (so the other heads' φ is normalised over the
  remaining channels) and its v channels. Masking its output alone would not be that: φ(k)'s
  per-token norms include the removed head's channels, and the other heads' outputs change when they
  go (φ(q)'s do not matter: each head's output is invariant to a per-token scale of q). So the head
  mask acts on the head's output, as for every kind, and on its q and k at φ's input, like the q/k
  channel gates: at 0 it leaves only (1e-6)² in φ's norms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from search.attention.base import (
    AttentionActivations,
    AttentionShape,
    GateValues,
    HeadValues,
    HeadWeights,
    MeasurableKind,
    TokenLayout,
    head_rows,
    register_kind,
    split_fused_qkv,
)
from search.core.errors import PlanError
from search.models.flatten.attention import KERNEL_EPS, NORMALISER_EPS, FocusedLinearAttention
from search.cut.slicing import check_indices, slice_linear

if TYPE_CHECKING:
    from search.cut.blocks import BlockPlan

CHUNK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class LinearAttentionShape(AttentionShape):
    """Widths of a focused linear attention module and the side of its DWC kernel."""

    kernel_size: int = 5


def focus(y: torch.Tensor, p: float) -> torch.Tensor:
    """f_p(y) = ‖y‖ · yᵖ / ‖yᵖ‖ over the last dimension, for y > 0 (zeros stand for deleted channels)."""
    y_p = y**p
    return y_p * (y.norm(dim=-1, keepdim=True) / y_p.norm(dim=-1, keepdim=True))


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Normalised linear attention per head, in the module's form: (q (kᵀv)/n) / (q · mean(k)ᵀ + eps)."""
    n = q.shape[-2]
    kv = (k.transpose(-2, -1) * n**-0.5) @ (v * n**-0.5)
    return (q @ kv) / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + NORMALISER_EPS)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(…, tokens, heads·d) → (…, heads, tokens, d)."""
    *lead, n, c = x.shape
    return x.reshape(*lead, n, heads, c // heads).transpose(-3, -2)


class FocusedLinearKind(MeasurableKind):
    """FLatten's focused linear attention with a shared depthwise conv on v."""

    name = "linear"
    supports = "FLatten's FocusedLinearAttention (focused linear)"
    shared_v_indices = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, FocusedLinearAttention)

    def shape(self, module: nn.Module) -> LinearAttentionShape:
        return LinearAttentionShape(embed_dim=module.qkv.in_features, num_heads=module.num_heads, qk_dim=module.qk_dim,
                                    v_dim=module.v_dim, kernel_size=module.dwc.kernel_size[0])

    def macs(self, shape: AttentionShape, heads: int, qk: int, v: int, layout: TokenLayout) -> int:
        n, d = layout.tokens, shape.embed_dim
        kernel = shape.kernel_size**2 if isinstance(shape, LinearAttentionShape) else 0
        products = heads * n * (2 * qk * v + qk)
        dwc = heads * layout.patches * v * kernel
        return n * d * heads * (2 * qk + v) + products + dwc + n * heads * v * d

    def head_weights(self, module: nn.Module) -> HeadWeights:
        h, dqk, dv = module.num_heads, module.qk_dim, module.v_dim
        q, k, v = split_fused_qkv(module.qkv.weight, h, dqk, dv)
        return HeadWeights(q=q, k=k, v=v, proj=module.proj.weight.reshape(module.proj.out_features, h, dv))

    def gate(self, module: nn.Module, values: GateValues) -> list[RemovableHandle]:
        def qk_hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            return out * values()[0].reshape(-1).to(out.dtype)

        def v_hook(_module: nn.Module, inputs: tuple) -> tuple:
            return (inputs[0] * values()[1].reshape(-1).to(inputs[0].dtype),)

        return [module.focus_q.register_forward_hook(qk_hook), module.focus_k.register_forward_hook(qk_hook),
                module.proj.register_forward_pre_hook(v_hook)]

    def head_gate(self, module: nn.Module, values: HeadValues) -> list[RemovableHandle]:
        dqk = module.qk_dim

        def qk_hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            return out * values().to(out.dtype).repeat_interleave(dqk)

        return super().head_gate(module, values) + [module.focus_q.register_forward_hook(qk_hook),
                                                    module.focus_k.register_forward_hook(qk_hook)]

    def capture(self, module: nn.Module, sink: Callable[[AttentionActivations], None]) -> list[RemovableHandle]:
        h, dqk = module.num_heads, module.qk_dim
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable:
            return lambda _m, _i, out: seen.__setitem__(name, out.detach().float())

        def v_part(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            seen["v"] = out.detach().float()[..., 2 * h * dqk:]

        def finish(_m: nn.Module, inputs: tuple) -> None:
            sink(AttentionActivations(q=_heads(seen["q"], h), k=_heads(seen["k"], h), v=_heads(seen["v"], h),
                                      output=inputs[0].detach().float()))

        return [module.focus_q.register_forward_hook(keep("q")), module.focus_k.register_forward_hook(keep("k")),
                module.qkv.register_forward_hook(v_part), module.proj.register_forward_pre_hook(finish)]

    @torch.no_grad()
    def attention_differences(self, module: nn.Module, acts: AttentionActivations) -> tuple[torch.Tensor, torch.Tensor]:
        h, dqk, dv = module.num_heads, module.qk_dim, module.v_dim
        dev = acts.q.device
        proj = module.proj.weight.double().to(dev).reshape(-1, h, dv)
        if acts.output is None:
            raise ValueError("focused linear attention needs the captured output to measure v channels")
        out = acts.output.double().reshape(*acts.output.shape[:-1], h, dv)
        v_diff = out.pow(2).sum(dim=(0, 1)) * proj.pow(2).sum(0)

        def kernel(x: torch.Tensor) -> torch.Tensor:  # (B, H, N, d) → (B, N, H·d), y = (ReLU(x) + eps) / softplus(s)
            x = x.double().transpose(1, 2).reshape(x.shape[0], x.shape[2], h * dqk)
            return (F.relu(x) + KERNEL_EPS) / F.softplus(module.scale.double().to(dev))

        yq, yk, v = kernel(acts.q), kernel(acts.k), acts.v.double()
        p = module.focusing_factor
        base = linear_attention(_heads(focus(yq, p), h), _heads(focus(yk, p), h), v)
        width = h * dqk
        qk_diff = torch.empty(width, dtype=torch.float64, device=dev)
        chunk = max(1, CHUNK_BYTES // (yq.numel() * 8 * 4))
        for start in range(0, width, chunk):
            cs = torch.arange(start, min(width, start + chunk), device=dev)
            keep = torch.ones(len(cs), width, dtype=torch.float64, device=dev)
            keep[torch.arange(len(cs), device=dev), cs] = 0.0
            mask = keep[:, None, None, :]
            removed = linear_attention(_heads(focus(yq * mask, p), h), _heads(focus(yk * mask, p), h), v.unsqueeze(0))
            change = torch.einsum("cbhnd,ehd->cbne", removed - base.unsqueeze(0), proj)
            qk_diff[cs] = change.pow(2).sum(dim=(1, 2, 3))
        return qk_diff.reshape(h, dqk).float(), v_diff.float()

    def slice(self, module: nn.Module, plan: BlockPlan) -> FocusedLinearAttention:
        h, dqk, dv = module.num_heads, module.qk_dim, module.v_dim
        if len(set(plan.v)) != 1:
            raise PlanError("focused linear attention shares its DWC across heads: every head must keep the same v channels")
        v_idx = list(plan.v[0])
        check_indices(v_idx, dv, "DWC channels")
        q_cols = head_rows(0, dqk, plan.heads, plan.qk)
        widths = plan.widths
        new = FocusedLinearAttention(
            dim=module.qkv.in_features, num_heads=widths.heads, qk_dim=widths.qk, v_dim=widths.v,
            grid_size=module.grid_size, num_prefix_tokens=module.num_prefix_tokens, qkv_bias=module.qkv.bias is not None,
            proj_bias=module.proj.bias is not None, focusing_factor=module.focusing_factor, kernel_size=module.dwc.kernel_size[0],
        ).to(device=module.qkv.weight.device, dtype=module.qkv.weight.dtype)
        new.qkv = slice_linear(module.qkv, out_idx=q_cols + head_rows(h * dqk, dqk, plan.heads, plan.qk)
                               + head_rows(2 * h * dqk, dv, plan.heads, plan.v))
        new.proj = slice_linear(module.proj, in_idx=head_rows(0, dv, plan.heads, plan.v))
        cols = torch.tensor(q_cols, device=module.scale.device)
        rows = torch.tensor(v_idx, device=module.dwc.weight.device)
        with torch.no_grad():
            new.scale.copy_(module.scale[..., cols])
            new.positional_encoding.copy_(module.positional_encoding[..., cols])
            new.dwc.weight.copy_(module.dwc.weight[rows])
            if module.dwc.bias is not None:
                new.dwc.bias.copy_(module.dwc.bias[rows])
        return new.train(module.training)


register_kind(FocusedLinearKind())
