"""The attention-kind contract, checked on every registered kind through one example module each.

A kind has two sides (``search.attention.base``): cutting, which every kind has (recognise, shape,
MACs, slice, reweight target), and measuring, which only a :class:`MeasurableKind` has (head
weights, gates, capture, attention differences, head gate). The checks below hold each side to
what the generic code relies on, at the level of one attention module:

- cutting: ``kind_of`` finds the kind and no other kind claims its module; MACs are linear in each
  width and accept float widths (the search prices soft widths); a sliced module is of the same
  kind, has the plan's widths and a reweight slot before its reweight target, and keeping
  everything changes nothing;
- measuring: gates at one change nothing, a gate at zero equals slicing the channel away, a head
  mask at zero equals slicing the head away, capture hands over one set of activations per
  forward, and the attention difference of one channel is the squared change of the output when
  that channel alone is gated to zero.

Every registered kind needs an entry in :data:`EXAMPLES`; a kind registered by a test file (the
toy kind) adds its own and runs :func:`check_cutting` and :func:`check_measuring` itself.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from timm.layers import Attention
from torch import nn

from search.attention import AttentionKind, MeasurableKind, TokenLayout, get_kind, kind_names, kind_of, measurable
from search.attention.removed import RemovedAttention
from search.core.errors import PlanError, UnknownModelError
from search.models.flatten.attention import FocusedLinearAttention
from search.cut.blocks import BlockPlan

DIM, HEADS = 64, 4
LAYOUT = TokenLayout(prefix=1, grid=(4, 4))  # 17 tokens: the FLatten example's DWC runs on this grid


def _nonzero(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-zero biases and FLatten parameters, so that slicing them matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() <= 1 or p.shape[0] == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _softmax() -> nn.Module:
    torch.manual_seed(0)
    return _nonzero(Attention(DIM, num_heads=HEADS, qkv_bias=True))


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return _nonzero(FocusedLinearAttention.dense(DIM, HEADS, LAYOUT.grid, LAYOUT.prefix))


EXAMPLES: dict[str, Callable[[], nn.Module]] = {"softmax": _softmax, "linear": _linear, "removed": lambda: RemovedAttention(DIM)}
"""Kind name → a small module of that kind taking (batch, 17, 64) tokens."""


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, LAYOUT.tokens, DIM, generator=torch.Generator().manual_seed(seed))


def _plan(heads: tuple[int, ...], qk: tuple[int, ...], v: tuple[int, ...]) -> BlockPlan:
    return BlockPlan(heads=heads, qk=(qk,) * len(heads), v=(v,) * len(heads), mlp=(0,))


def check_cutting(kind: AttentionKind, make: Callable[[], nn.Module]) -> None:
    """The cutting side of ``kind`` on the module ``make()`` builds."""
    module = make()
    assert kind_of(module) is kind
    assert [name for name in kind_names() if get_kind(name).matches(module)] == [kind.name]
    shape = kind.shape(module)
    assert shape.embed_dim == DIM
    h, dqk, dv = shape.num_heads, shape.qk_dim, shape.v_dim
    if h == 0:  # nothing left to cut: MACs are 0 and only a plan that keeps no head fits
        assert kind.macs(shape, 0, 0, 0, LAYOUT) == 0 and kind.reweight_target(module) is None
        assert kind.slice(module, _plan((), (), ())) is module
        with pytest.raises(PlanError):
            kind.slice(module, _plan((0,), (0,), (0,)))
        return
    macs = lambda heads, qk, v: kind.macs(shape, heads, qk, v, LAYOUT)  # noqa: E731
    assert macs(h, dqk, dv) > 0
    for heads in (1, h):  # linear in each width: equal steps cost equal MACs
        assert macs(heads, 3, dv) - macs(heads, 2, dv) == macs(heads, 2, dv) - macs(heads, 1, dv)
        assert macs(heads, dqk, 3) - macs(heads, dqk, 2) == macs(heads, dqk, 2) - macs(heads, dqk, 1)
    soft = macs(h, torch.tensor(float(dqk), requires_grad=True), torch.tensor(float(dv)))
    assert float(soft.detach()) == pytest.approx(macs(h, dqk, dv)) and soft.requires_grad
    x = tokens()
    with torch.no_grad():
        everything = kind.slice(module, _plan(tuple(range(h)), tuple(range(dqk)), tuple(range(dv))))
        torch.testing.assert_close(everything(x), module(x), atol=1e-5, rtol=1e-5)
    plan = _plan((0, h - 1), (0, 2, 5, dqk - 1), (1, 3, dv - 1))
    sliced = kind.slice(module, plan)
    assert kind_of(sliced) is kind and sliced is not module
    s = kind.shape(sliced)
    assert (s.num_heads, s.qk_dim, s.v_dim) == (2, 4, 3)
    assert kind.macs(s, 2, 4, 3, LAYOUT) == macs(2, 4, 3)
    assert isinstance(sliced.reweight, nn.Identity) and kind.reweight_target(sliced).in_features == 2 * 3


def _gated(kind: MeasurableKind, module: nn.Module, x: torch.Tensor, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    handles = kind.gate(module, lambda: (qk, v))
    try:
        return module(x)
    finally:
        for handle in handles:
            handle.remove()


def check_measuring(kind: MeasurableKind, make: Callable[[], nn.Module], atol: float = 1e-5) -> None:
    """The measuring side of ``kind``; ``atol`` bounds gate-at-zero against removal (FLatten's φ keeps an ε²)."""
    module, x = make(), tokens()
    assert measurable(kind) is kind
    s = kind.shape(module)
    h, dqk, dv = s.num_heads, s.qk_dim, s.v_dim
    w = kind.head_weights(module)
    assert w.q.shape == w.k.shape == (h, dqk, DIM) and w.v.shape == (h, dv, DIM) and w.proj.shape == (DIM, h, dv)
    ones_qk, ones_v = torch.ones(h, dqk), torch.ones(h, dv)
    with torch.no_grad():
        base = module(x)
        torch.testing.assert_close(_gated(kind, module, x, ones_qk, ones_v), base)
        qk_keep, v_keep = (0, 2, 5, dqk - 1), (1, 3, dv - 1)
        qk_gate, v_gate = torch.zeros(h, dqk), torch.zeros(h, dv)
        qk_gate[:, list(qk_keep)], v_gate[:, list(v_keep)] = 1.0, 1.0
        sliced = kind.slice(module, _plan(tuple(range(h)), qk_keep, v_keep))
        torch.testing.assert_close(sliced(x), _gated(kind, module, x, qk_gate, v_gate), atol=atol, rtol=0)
        mask = torch.ones(h)
        mask[1] = 0.0
        handles = kind.head_gate(module, lambda: mask)
        try:
            masked = module(x)
        finally:
            for handle in handles:
                handle.remove()
        kept = tuple(i for i in range(h) if i != 1)
        torch.testing.assert_close(kind.slice(module, _plan(kept, tuple(range(dqk)), tuple(range(dv))))(x), masked,
                                   atol=atol, rtol=0)
        seen = []
        handles = kind.capture(module, seen.append)
        try:
            module(x)
        finally:
            for handle in handles:
                handle.remove()
    assert len(seen) == 1
    acts = seen[0]
    assert acts.q.shape == acts.k.shape == (2, h, LAYOUT.tokens, dqk) and acts.v.shape == (2, h, LAYOUT.tokens, dv)
    qk_diff, v_diff = kind.attention_differences(module, acts)
    assert qk_diff.shape == (h, dqk) and v_diff.shape == (h, dv)
    with torch.no_grad():
        for head, ch in ((0, 3), (h - 1, dqk - 1), (1, 0)):
            off = ones_qk.clone()
            off[head, ch] = 0.0
            change = _gated(kind, module, x, off, ones_v) - base
            assert change.pow(2).sum().item() == pytest.approx(qk_diff[head, ch].item(), rel=1e-3)
        for head, ch in ((0, 1), (h - 1, dv - 1)):
            off = ones_v.clone()
            off[head, ch] = 0.0
            change = _gated(kind, module, x, ones_qk, off) - base
            assert change.pow(2).sum().item() == pytest.approx(v_diff[head, ch].item(), rel=1e-4)


def test_every_registered_kind_has_an_example() -> None:
    assert set(kind_names()) <= set(EXAMPLES), "add an example module for every new kind to EXAMPLES"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_cutting_contract(name: str) -> None:
    check_cutting(get_kind(name), EXAMPLES[name])


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if isinstance(get_kind(n), MeasurableKind)))
def test_measuring_contract(name: str) -> None:
    check_measuring(get_kind(name), EXAMPLES[name])


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if not isinstance(get_kind(n), MeasurableKind)))
def test_a_kind_without_a_measuring_side_is_refused_by_the_search_in_one_line(name: str) -> None:
    with pytest.raises(UnknownModelError, match=f"cannot measure attention of kind '{name}' \\(block 3\\)"):
        measurable(get_kind(name), "block 3")
