"""A third attention kind, defined and registered in this file only, through the whole pipeline.

The point of the attention seam (``search.attention.base``) is that a new kind of attention needs
its own module and its own ``AttentionKind``, and no change to generic code. This file holds both
for a toy kind, ELU linear attention without a DWC (a classic linear transformer),

    O_h = φ(q_h) (φ(k_h)ᵀ v_h / n) / (φ(q_h) · meanₙ φ(k_h)ᵀ + ε),  φ(x) = ELU(x) + 1 > 0,

puts it into a tiny timm VisionTransformer next to a softmax block, and runs describe, the planner
(magnitude scores), surgery, ONNX export, parity in ONNX Runtime and the analytic-against-graph
MAC count on it, plus the search's gates, capture, attention differences (the kind contract of
tests/test_kind_contract.py) and reweights. Nothing
outside this file knows the kind.

Registration happens once per process (``_register`` is idempotent) and the kind recognises only
modules of the toy class, so every other test's models keep the kinds they had.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs
from exporter.reweight import HeadReweight, UnitScale, add_reweights, fold_reweights
from exporter.surgery import apply_plan
from exporter.parity import check_parity
from search.methods.acp import AcpConfig, acp_search
from search.budget.allocate import SolverConfig, make_plan
from search.attention import (
    AttentionActivations,
    AttentionKind,
    AttentionShape,
    GateValues,
    HeadWeights,
    MeasurableKind,
    TokenLayout,
    get_kind,
    head_rows,
    kind_names,
    kind_of,
    register_kind,
    split_fused_qkv,
)
from search.core.runtime import Runtime
from search.methods.gates import ChannelGates, gated
from search.methods.importance import BlockScores, magnitude_scores
from search.budget.macs import describe, model_macs
from search.budget.plan import Plan
from search.cut.blocks import BlockPlan
from search.cut.slicing import slice_linear
from tests.conftest import tiny_vit
from tests.test_kind_contract import DIM, EXAMPLES, HEADS, check_cutting, check_measuring

NAME = "toy-elu-linear"
EPS = 1e-6


class ToyLinearAttention(nn.Module):
    """ELU linear attention, heads of ``qk_dim`` q/k and ``v_dim`` v channels, no DWC, no softmax.

    ``kernel_q`` and ``kernel_k`` are identities on φ(q) and φ(k), named so that the kind can gate
    and read them; ``reweight`` sits before ``proj`` so recovery's reweights fold into it.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.kernel_q: nn.Module = nn.Identity()
        self.kernel_k: nn.Module = nn.Identity()
        self.reweight: nn.Module = nn.Identity()
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("linear attention has no attention matrix to mask")
        b, n, _ = x.shape
        h, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([h * dqk, h * dqk, h * dv], dim=-1)
        q = self.kernel_q(F.elu(q) + 1).reshape(b, n, h, dqk).transpose(1, 2)
        k = self.kernel_k(F.elu(k) + 1).reshape(b, n, h, dqk).transpose(1, 2)
        v = v.reshape(b, n, h, dv).transpose(1, 2)
        out = _linear_attention(q, k, v)
        return self.proj(self.reweight(out.transpose(1, 2).reshape(b, n, h * dv)))


def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(q (kᵀv)/n) / (q · mean(k)ᵀ + ε) per head, for φ(q), φ(k) (…, heads, tokens, d)."""
    n = q.shape[-2]
    kv = (k.transpose(-2, -1) * n**-0.5) @ (v * n**-0.5)
    return (q @ kv) / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + EPS)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads·d) → (batch, heads, tokens, d)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


class ToyLinearKind(MeasurableKind):
    """The kind for :class:`ToyLinearAttention`.

    - MACs: qkv N·D·H·(2·d_qk + d_v), kᵀv and q·(kᵀv) H·N·d_qk·d_v each, the normaliser H·N·d_qk, proj N·H·d_v·D.
    - Removing q/k channel j of head h removes the term φ(q)_j φ(k)_j from both sums; scaling φ(q)_j
      alone scales exactly that term, so the q/k gate acts on φ(q) only. A v gate scales proj's input.
    - No part is shared by the heads: per-head indices are allowed.
    """

    name = NAME

    def matches(self, module: nn.Module) -> bool:
        # By class name: a second import of this file makes a second class, which must still match.
        return type(module).__name__ == ToyLinearAttention.__name__ and hasattr(module, "kernel_q")

    def shape(self, module: nn.Module) -> AttentionShape:
        return AttentionShape(embed_dim=module.qkv.in_features, num_heads=module.num_heads, qk_dim=module.qk_dim, v_dim=module.v_dim)

    def macs(self, shape: AttentionShape, heads: int, qk: int, v: int, layout: TokenLayout) -> int:
        n, d = layout.tokens, shape.embed_dim
        return n * d * heads * (2 * qk + v) + heads * n * (2 * qk * v + qk) + n * heads * v * d

    def head_weights(self, module: nn.Module) -> HeadWeights:
        h, dqk, dv = module.num_heads, module.qk_dim, module.v_dim
        q, k, v = split_fused_qkv(module.qkv.weight, h, dqk, dv)
        return HeadWeights(q=q, k=k, v=v, proj=module.proj.weight.reshape(module.proj.out_features, h, dv))

    def gate(self, module: nn.Module, values: GateValues) -> list[RemovableHandle]:
        def qk_hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
            return out * values()[0].reshape(-1).to(out.dtype)

        def v_hook(_m: nn.Module, inputs: tuple) -> tuple:
            return (inputs[0] * values()[1].reshape(-1).to(inputs[0].dtype),)

        return [module.kernel_q.register_forward_hook(qk_hook), module.proj.register_forward_pre_hook(v_hook)]

    def capture(self, module: nn.Module, sink: Callable[[AttentionActivations], None]) -> list[RemovableHandle]:
        h, dqk = module.num_heads, module.qk_dim
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable:
            return lambda _m, _i, out: seen.__setitem__(name, out.detach().float())

        def v_part(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            seen["v"] = out.detach().float()[..., 2 * h * dqk:]

        def finish(_m: nn.Module, _inputs: tuple) -> None:  # proj's input: every part of this forward is seen
            sink(AttentionActivations(q=_heads(seen["q"], h), k=_heads(seen["k"], h), v=_heads(seen["v"], h)))

        return [module.kernel_q.register_forward_hook(keep("q")), module.kernel_k.register_forward_hook(keep("k")),
                module.qkv.register_forward_hook(v_part), module.proj.register_forward_pre_hook(finish)]

    @torch.no_grad()
    def attention_differences(self, module: nn.Module, acts: AttentionActivations) -> tuple[torch.Tensor, torch.Tensor]:
        h, dqk, dv = module.num_heads, module.qk_dim, module.v_dim
        q, k, v = acts.q.double(), acts.k.double(), acts.v.double()
        proj = module.proj.weight.double().to(q.device).reshape(-1, h, dv)
        n = q.shape[-2]
        kv = (k.transpose(-2, -1) * n**-0.5) @ (v * n**-0.5)  # (B, H, d, dv)
        kmean = k.mean(dim=-2)  # (B, H, d)
        num, den = q @ kv, q @ kmean.unsqueeze(-1) + EPS
        base = num / den
        v_diff = base.pow(2).sum(dim=(0, 2)) * proj.pow(2).sum(0)
        qk_diff = torch.empty(h, dqk, dtype=torch.float64, device=q.device)
        for head in range(h):
            qh = q[:, head].permute(2, 0, 1).unsqueeze(-1)  # (d, B, N, 1): φ(q)_j per channel j
            term_num = qh * kv[:, head].permute(1, 0, 2).unsqueeze(2)  # (d, B, N, dv)
            term_den = qh * kmean[:, head].T[:, :, None, None]  # (d, B, N, 1)
            removed = (num[:, head] - term_num) / (den[:, head] - term_den)
            change = (removed - base[:, head]) @ proj[:, head].T
            qk_diff[head] = change.pow(2).sum(dim=(1, 2, 3))
        return qk_diff.float(), v_diff.float()

    def slice(self, module: nn.Module, plan: BlockPlan) -> ToyLinearAttention:
        h, dqk, dv = module.num_heads, module.qk_dim, module.v_dim
        widths = plan.widths
        new = ToyLinearAttention(module.qkv.in_features, widths.heads, widths.qk, widths.v,
                                 qkv_bias=module.qkv.bias is not None, proj_bias=module.proj.bias is not None)
        rows = (head_rows(0, dqk, plan.heads, plan.qk) + head_rows(h * dqk, dqk, plan.heads, plan.qk)
                + head_rows(2 * h * dqk, dv, plan.heads, plan.v))
        new.qkv = slice_linear(module.qkv, out_idx=rows)
        new.proj = slice_linear(module.proj, in_idx=head_rows(0, dv, plan.heads, plan.v))
        return new.train(module.training)


def _register() -> AttentionKind:
    """The toy kind, registered on first call only (the registry refuses a name twice)."""
    if NAME in kind_names():
        return get_kind(NAME)
    return register_kind(ToyLinearKind())


KIND = _register()
PATTERN = "TST"  # T: toy, S: timm's softmax Attention


def _example() -> ToyLinearAttention:
    """A toy module for the kind contract (tests/test_kind_contract.py), non-zero biases included."""
    torch.manual_seed(0)
    module = ToyLinearAttention(DIM, HEADS, DIM // HEADS, DIM // HEADS)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return module.eval()


EXAMPLES.setdefault(NAME, _example)  # every registered kind has an example there


def toy_vit(pattern: str = PATTERN, seed: int = 0) -> nn.Module:
    """A tiny timm ViT (4 heads of 16, a register token) with toy attention where ``pattern`` says T."""
    model = tiny_vit(depth=len(pattern), num_heads=4, embed_dim=64, reg_tokens=1)
    torch.manual_seed(seed)
    for block, kind in zip(model.blocks, pattern):
        if kind == "T":
            block.attn = ToyLinearAttention(64, 4, 16, 16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero biases everywhere, so slicing them matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_registration_is_once_per_process_and_claims_only_the_toy_class() -> None:
    assert _register() is KIND and kind_names().count(NAME) == 1
    model = toy_vit()
    assert [kind_of(b.attn).name for b in model.blocks] == [NAME, "softmax", NAME]
    assert not KIND.matches(tiny_vit().blocks[0].attn)  # timm's Attention stays softmax


def test_the_toy_kind_keeps_the_kind_contract() -> None:
    check_cutting(KIND, _example)
    check_measuring(KIND, _example)


def test_describe_reads_the_toy_blocks_through_the_kind() -> None:
    geometry = describe(toy_vit())
    assert [b.kind for b in geometry.blocks] == [NAME, "softmax", NAME]
    assert geometry.blocks[0].attention == AttentionShape(embed_dim=64, num_heads=4, qk_dim=16, v_dim=16)
    # No N² term: the toy block's mixing is cheaper than softmax's at the same widths (17 + 1 tokens).
    assert model_macs(geometry) < model_macs(describe(toy_vit("SSS")))


@pytest.mark.parametrize("per_head", [False, True], ids=["shared-indices", "per-head-indices"])
def test_plan_surgery_export_parity_and_macs(tmp_path, per_head: bool) -> None:
    model = toy_vit()
    geometry = describe(model)
    plan = make_plan(geometry, magnitude_scores(model), SolverConfig(0.6, align=4, per_head_indices=per_head),
                     model="toy", img_size=32, method="magnitude")
    assert plan.pruned_macs <= 0.6 * plan.dense_macs
    assert plan.blocks[0].widths.qk < 16 or plan.blocks[0].widths.v < 16  # the toy blocks were cut too
    assert any(len(set(b.qk)) > 1 for b in plan.blocks) == per_head
    pruned = apply_plan(model, plan, geometry)
    assert isinstance(pruned.blocks[0].attn, ToyLinearAttention) and isinstance(model.blocks[0].attn, ToyLinearAttention)
    assert model_macs(describe(pruned)) == plan.pruned_macs
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name, m in (("dense", model), ("pruned", pruned)):
        path = export_onnx(m, tmp_path / f"{name}.onnx", (3, 32, 32))
        assert check_parity(path, m, images, classifier=True).passed, name
        assert count_onnx_macs(path) == model_macs(describe(m)), name


def test_surgery_equals_the_dense_model_gated_to_zero() -> None:
    model = toy_vit()
    geometry = describe(model)
    qk, v = (0, 3, 4, 9, 15), (1, 2, 8, 10, 11, 14)
    blocks, init = [], []
    for g in geometry.blocks:
        a = g.attention
        heads = tuple(range(a.num_heads))
        blocks.append(BlockPlan(heads=heads, qk=(qk,) * a.num_heads, v=(v,) * a.num_heads, mlp=tuple(range(0, g.mlp_hidden, 3))))
        logits = [torch.full(shape, -60.0) for shape in ((a.num_heads, a.qk_dim), (a.num_heads, a.v_dim), (g.mlp_hidden,))]
        logits[0][:, list(qk)] = logits[1][:, list(v)] = 60.0
        logits[2][::3] = 60.0
        init.append(BlockScores(qk=logits[0], v=logits[1], mlp=logits[2]))
    widths = tuple(b.widths for b in blocks)
    plan = Plan(model="toy", img_size=32, method="test", budget=1.0, align=1, dense_macs=model_macs(geometry),
                pruned_macs=model_macs(geometry, widths), blocks=tuple(blocks))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), gated(model, ChannelGates(geometry, init=tuple(init))):
        reference = model(x)
    with torch.no_grad():
        got = apply_plan(model, plan)(x)
    assert torch.allclose(got, reference, atol=1e-5), (got - reference).abs().max()


def test_acp_search_and_reweights_run_through_the_toy_kind() -> None:
    model = toy_vit()
    geometry = describe(model)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    scores = acp_search(model, geometry, images, AcpConfig(budget=0.6, steps=3, batch_size=8, calib_images=4), True,
                        Runtime(torch.device("cpu"))).scores
    plan = make_plan(geometry, scores, SolverConfig(0.6, align=4, normalise=False), model="toy", img_size=32, method="acp")
    pruned = add_reweights(apply_plan(model, plan))
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, (HeadReweight, UnitScale)):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
        before = pruned(images[:2])
        fold_reweights(pruned)
        after = pruned(images[:2])
    assert isinstance(pruned.blocks[0].attn.reweight, nn.Identity)
    assert torch.isfinite(after).all() and torch.allclose(before, after, atol=1e-5)
