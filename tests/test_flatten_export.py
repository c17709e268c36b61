"""FLatten exported to ONNX at activation scales where the literal focusing map breaks in fp32.

φ(x) = ‖y‖ · yᵖ / ‖yᵖ‖ with y = (ReLU(x) + 1e-6) / softplus(s) and p = 3. Written literally, ‖yᵖ‖
squares yᵖ, i.e. takes y⁶: for y around 1e8 that overflows fp32 (‖yᵖ‖ = inf, and φ collapses to 0),
and for y below about 1e-8 it underflows (‖yᵖ‖ = 0, and φ = 0/0 = NaN). Activations of 1e3 or
1e-4 alone stay inside fp32's range for p = 3 (they break fp16, tested in test_flatten_attention);
the two regimes below are pushed far enough that the literal form really breaks, which each test
checks first, so it cannot pass by being too gentle.

- ``large``: q/k rows of every linear block's qkv (and their biases, and the positional encoding)
  scaled by 1e8;
- ``tiny``: the same scaled by 1e-4, with softplus(s) ≈ 1e3, so y ≈ 1e-9 to 1e-7.

The exported fp32 graph must pass ``check_parity`` in ONNX Runtime, give finite outputs, and
agree with the same model run in float64 (where the literal form is exact), so a model that
stayed finite by computing the wrong φ fails too.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporter.onnx_export import export_onnx
from exporter.runtimes.ort import make_session
from exporter.parity import check_parity
from search.attention import kind_of
from search.models.flatten.kind import focus
from search.models.flatten.attention import FocusedLinearAttention
from tests.test_flatten_kind import tiny_flatten

REGIMES = {"large": (1e8, 0.0), "tiny": (1e-4, 1e3)}  # (q/k scale, raw FLatten scale s: softplus(1e3) = 1e3)


def _extreme(regime: str) -> torch.nn.Module:
    """tiny_flatten("LL") with every linear block's q/k pushed to ``regime``'s scale."""
    factor, s = REGIMES[regime]
    model = tiny_flatten("LL")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FocusedLinearAttention):
                qk_rows = 2 * m.num_heads * m.qk_dim
                m.qkv.weight[:qk_rows] *= factor
                m.qkv.bias[:qk_rows] *= factor
                m.positional_encoding.mul_(factor)
                m.scale.fill_(s)
    return model


def _focus_inputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y = (ReLU(q) + 1e-6) / softplus(s) of block 0's q, all heads side by side, as φ sees it."""
    attn = model.blocks[0].attn
    seen = []
    handles = kind_of(attn).capture(attn, seen.append)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    q = seen[0].q.transpose(1, 2).reshape(x.shape[0], attn.num_tokens, -1)
    return (F.relu(q) + 1e-6) / F.softplus(attn.scale.detach())


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_onnx_parity_where_the_literal_focusing_map_breaks(tmp_path, regime: str) -> None:
    model = _extreme(regime)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    y = _focus_inputs(model, x)
    literal32, exact = focus(y, 3), focus(y.double(), 3)
    assert torch.isfinite(exact).all()
    broken = ~torch.isfinite(literal32).all() or (literal32.double() - exact).abs().max() > 0.1 * exact.abs().max()
    assert broken, f"{regime}: the literal fp32 focusing map still works here (y in [{y.min():.1e}, {y.max():.1e}])"

    path = export_onnx(model, tmp_path / f"{regime}.onnx", (3, 32, 32))
    parity = check_parity(path, model, x, classifier=True)
    assert parity.passed and parity.min_cosine >= 0.9999
    session = make_session(path, threads=1)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.isfinite(got).all()
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double()).numpy()
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4 * np.abs(reference).max())
