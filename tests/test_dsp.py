"""DSP and head selection: the soft top-k, the annealing, K per scope and per budget, the search itself."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from search.budget.allocate import SolverConfig, head_plan, make_plan
from search.core.errors import BudgetError, OptionError
from search.core.runtime import Runtime
from search.methods.dsp import DspConfig, dsp_search, hard_topk, soft_topk, straight_through, temperature
from search.methods.heads import HeadTarget, head_magnitude_scores, head_only_widths, heads_for_budget, layer_counts, top_heads
from search.methods.importance import random_scores
from search.budget.macs import describe, model_macs
from search.methods.registry import METHODS, SearchInputs, head_budget
from search.methods.acp import AcpConfig
from tests.conftest import tiny_vit

CPU = Runtime(torch.device("cpu"))
TEMPERATURES = (1e-8, 1e-3, 0.1, 1.0, 10.0, 1e3)


@pytest.mark.parametrize("n", [1, 3, 12, 72])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_the_soft_top_k_mask_sums_to_k_for_any_logits_k_and_temperature(n, scale):
    gen = torch.Generator().manual_seed(n)
    for k in sorted({0, 1, n // 2, n - 1, n} & set(range(n + 1))):
        for t in TEMPERATURES:
            for trial in range(3):
                logits = scale * torch.randn(n, generator=gen, dtype=torch.float64)
                noise = None if trial == 0 else -torch.log(-torch.log(torch.rand(n, generator=gen, dtype=torch.float64)))
                mask = soft_topk(logits, k, t, noise)
                assert mask.sum().item() == pytest.approx(k, abs=1e-9), (n, k, t)
                assert (mask >= 0).all()
                if t <= 1e-8:  # cold: the hard top-k of logits + noise, whatever their spread
                    r = logits if noise is None else logits + noise
                    assert torch.equal(mask.round(), hard_topk(r, k)) and (mask - mask.round()).abs().max() < 1e-6
                single = soft_topk(logits.float(), k, t, noise)  # float32 logits: float32 mask, same sum to rounding
                assert single.dtype == torch.float32 and single.double().sum().item() == pytest.approx(k, abs=1e-5)


def test_at_a_low_temperature_the_soft_top_k_is_the_hard_top_k():
    logits = torch.tensor([0.3, -1.0, 2.0, 0.1, 1.5], dtype=torch.float64)
    mask = soft_topk(logits, 2, 1e-4)
    torch.testing.assert_close(mask, torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    assert soft_topk(logits, 2, 1e3).sub(0.4).abs().max() < 1e-3  # a high temperature spreads k evenly
    torch.testing.assert_close(soft_topk(torch.log(torch.tensor([10.0, 1.0], dtype=torch.float64)), 2, 1.0),
                               torch.tensor([10 / 11 + 0.5, 1 / 11 + 0.5], dtype=torch.float64))  # the paper's rule, exactly


def test_straight_through_is_the_hard_top_k_forward_and_the_soft_gradient_backward():
    logits = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.arange(6, dtype=torch.float64)
    mask = soft_topk(logits, 3, 0.5)
    hard = straight_through(mask, 3)
    assert torch.equal(hard.detach(), hard_topk(mask, 3)) and set(hard.detach().tolist()) == {0.0, 1.0}
    assert hard.sum().item() == 3
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    (g_soft,) = torch.autograd.grad((soft_topk(logits, 3, 0.5) * weights).sum(), logits)
    torch.testing.assert_close(g_hard, g_soft)


def test_the_temperature_falls_log_linearly_to_tf_over_the_cooldown_and_is_then_held():
    config = DspConfig(steps=40, t0=10.0, tf=0.01)
    assert config.cooldown_steps == 30
    ts = [config.temperature(s) for s in range(45)]
    assert ts[0] == 10.0 and ts[30] == 0.01 and all(t == 0.01 for t in ts[30:])
    logs = [math.log(t) for t in ts[:31]]
    steps = [b - a for a, b in zip(logs, logs[1:])]
    assert all(s == pytest.approx(math.log(0.001) / 30, rel=1e-9) for s in steps)
    assert temperature(5, 1000.0, 1e-8, 10) == pytest.approx(math.sqrt(1000.0 * 1e-8), rel=1e-9)  # the geometric middle
    assert DspConfig(steps=40, cooldown=8).temperature(8) == DspConfig.tf


@pytest.mark.parametrize("bad", [dict(t0=0.0), dict(tf=-1.0), dict(t0=0.1, tf=1.0), dict(cooldown=0), dict(lr=0.0)])
def test_bad_dsp_settings_are_refused(bad):
    with pytest.raises(OptionError):
        DspConfig(**bad)


@pytest.fixture
def geometry():
    return describe(tiny_vit(num_heads=4, embed_dim=64, depth=3))


def test_layer_counts_share_any_k_over_the_blocks(geometry):
    for k in range(13):
        counts = layer_counts(geometry, k)
        assert sum(counts) == k and max(counts) - min(counts) <= 1 and all(0 <= c <= 4 for c in counts)
    assert layer_counts(geometry, 5) == (2, 2, 1)  # the remainder goes to the earlier blocks
    with pytest.raises(OptionError, match="out of range"):
        layer_counts(geometry, 13)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_the_plan_keeps_exactly_k_heads_for_any_k(geometry, scope):
    gen = torch.Generator().manual_seed(1)
    for k in range(13):
        scores = tuple(torch.randn(4, generator=gen) for _ in range(3))
        heads = top_heads(scores, HeadTarget(k, scope), geometry)
        plan = head_plan(geometry, heads, 1.0, model="t", img_size=32, method="dsp")
        assert sum(w.heads for w in plan.widths()) == k
        if scope == "layer":
            assert tuple(w.heads for w in plan.widths()) == layer_counts(geometry, k)
        else:  # the k best scores of the whole model, wherever they are
            flat = torch.cat(scores)
            kept = {4 * i + h for i, hs in enumerate(heads) for h in hs}
            assert kept == set(flat.topk(k).indices.tolist())
        channels = make_plan(geometry, random_scores(geometry, k), SolverConfig(0.8, align=4), model="t", img_size=32,
                             method="dsp+acp", heads=heads)
        assert [b.heads for b in channels.blocks] == list(heads) and channels.pruned_macs <= 0.8 * channels.dense_macs


def test_a_global_scope_may_empty_a_block(geometry):
    scores = (torch.tensor([5.0, 4, 3, 2]), torch.tensor([-1.0, -2, -3, -4]), torch.tensor([1.0, 0, 0.5, 6]))
    heads = top_heads(scores, HeadTarget(5, "global"), geometry)
    assert heads == ((0, 1, 2, 3), (), (3,))
    assert head_plan(geometry, heads, 1.0, model="t", img_size=32, method="dsp").blocks[1].widths.heads == 0


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("budget", [0.75, 0.8, 0.9, 0.97, 1.0])
def test_k_from_the_budget_is_the_largest_k_whose_head_only_model_fits(geometry, scope, budget):
    k = heads_for_budget(geometry, budget, scope)
    dense = model_macs(geometry)

    def macs(total: int) -> int:
        return model_macs(geometry, head_only_widths(geometry, layer_counts(geometry, total)))

    assert macs(k) <= budget * dense  # every block's heads cost the same here, so both scopes price K alike
    assert k == 12 or macs(k + 1) > budget * dense


def test_a_budget_below_the_model_without_heads_is_refused(geometry):
    with pytest.raises(BudgetError, match="dsp\\+acp"):
        heads_for_budget(geometry, 0.3, "layer")


def test_dsp_plus_acp_leaves_part_of_the_cut_to_channels():
    assert head_budget("dsp", 0.63) == 0.63 and head_budget("head-magnitude", 0.63) == 0.63
    assert head_budget("dsp+acp", 0.6) == pytest.approx(0.8) and head_budget("dsp+acp", 0.6, share=1.0) == pytest.approx(0.6)


def _dead_heads_model():
    """4 heads in each of 2 blocks; head 2 of block 0 and head 1 of block 1 add nothing to the output."""
    model = tiny_vit(num_heads=4, embed_dim=64, depth=2)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 32:48] = 0
        model.blocks[1].attn.proj.weight[:, 16:32] = 0
    return model


@pytest.mark.parametrize("scope, straight, steps", [("layer", False, 12), ("global", False, 12), ("layer", True, 20)])
def test_dsp_removes_the_heads_that_do_nothing(scope, straight, steps):
    # A dead head's mask changes nothing, but the mask's k are shared: mass on it is mass lost to the others.
    model = _dead_heads_model()
    geometry = describe(model)
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = DspConfig(steps=steps, batch_size=8, straight_through=straight)
    result = dsp_search(model, geometry, images, HeadTarget(6, scope), config, True, CPU)
    assert result.heads == ((0, 1, 3), (0, 2, 3)), [s.tolist() for s in result.scores]


def test_a_killed_dsp_search_resumes_on_the_same_trajectory(tmp_path):
    model = _dead_heads_model()
    geometry = describe(model)
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    config = DspConfig(steps=8, batch_size=8, checkpoint_every=3, seed=2)
    target = HeadTarget(5, "global")
    reference = dsp_search(model, geometry, images, target, config, True, CPU)
    state = tmp_path / "dsp.pt"

    def die_at_7(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dsp_search(model, geometry, images, target, config, True, CPU, state_path=state, on_step=die_at_7)
    assert torch.load(state, weights_only=True)["step"] == 6
    steps = []
    resumed = dsp_search(model, geometry, images, target, config, True, CPU, state_path=state, on_step=steps.append)
    assert steps == [7, 8] and resumed.heads == reference.heads
    for a, b in zip(reference.scores, resumed.scores):
        torch.testing.assert_close(a, b)


def test_head_magnitude_removes_the_lowest_magnitude_heads():
    model = tiny_vit(num_heads=4, embed_dim=64, depth=2)
    with torch.no_grad():
        for block, head in ((0, 1), (1, 3)):
            attn = model.blocks[block].attn
            for part in range(3):  # q, k and v rows of the head
                rows = slice(part * 64 + 16 * head, part * 64 + 16 * (head + 1))
                attn.qkv.weight[rows] *= 0.1
            attn.proj.weight[:, 16 * head : 16 * (head + 1)] *= 0.1
    scores = head_magnitude_scores(model)
    assert [int(s.argmin()) for s in scores] == [1, 3]
    geometry = describe(model)
    inputs = SearchInputs(model, geometry, torch.randn(4, 3, 32, 32), True, AcpConfig(budget=1.0), CPU,
                          heads=HeadTarget(6, "layer"))
    assert METHODS["head-magnitude"].heads(inputs) == ((0, 2, 3), (0, 1, 2))


def test_dsp_plus_acp_meets_the_budget_on_the_kept_heads_only():
    model = tiny_vit(num_heads=4, embed_dim=64, depth=2)
    geometry = describe(model)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    budget = 0.6
    k = heads_for_budget(geometry, head_budget("dsp+acp", budget), "global")
    inputs = SearchInputs(model, geometry, images, True, AcpConfig(budget=budget, steps=3, batch_size=8, calib_images=4), CPU,
                          heads=HeadTarget(k, "global"), dsp=DspConfig(steps=3, batch_size=8))
    method = METHODS["dsp+acp"]
    kept = method.heads(inputs)
    scores = method.score(dataclasses.replace(inputs, kept=kept)).scores
    plan = make_plan(geometry, scores, SolverConfig(budget, align=4, normalise=False), model="t", img_size=32,
                     method="dsp+acp", heads=kept)
    assert plan.pruned_macs <= budget * plan.dense_macs
    assert tuple(b.heads for b in plan.blocks) == kept and sum(map(len, kept)) == k < 8
    assert any(w.qk < 16 or w.v < 16 for w in plan.widths() if w.heads)  # channels were cut as well


DDP_CONFIG = DspConfig(steps=6, batch_size=8, seed=3)
DDP_TARGET = HeadTarget(5, "global")


def ddp_case() -> tuple[torch.nn.Module, torch.Tensor]:
    """One small, fixed DSP problem shared by the in-process run and the torchrun worker."""
    return _dead_heads_model(), torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def test_two_gloo_processes_learn_the_single_process_logits(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    model, images = ddp_case()
    single = dsp_search(model, describe(model), images, DDP_TARGET, DDP_CONFIG, True, CPU)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.json"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(root / "tests" / "ddp_dsp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert tuple(map(tuple, ddp["heads"])) == single.heads
    # Adam divides each gradient by its running scale, so a dead head's near-zero gradient turns the
    # rounding difference between one batch of 8 and two of 4 into a visible, but small, step.
    for a, b in zip(ddp["scores"], single.scores):
        torch.testing.assert_close(torch.tensor(a), b, atol=1e-2, rtol=0)
