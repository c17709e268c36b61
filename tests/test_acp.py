"""The acp search: similarity weights, attention-difference init, determinism, resume, DDP."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from search.methods.acp import acp_search
from search.methods.train_loop import batch_indices
from search.methods.activations import capture
from search.budget.allocate import SolverConfig, make_plan
from search.methods.acp_init import attention_differences, init_logits
from search.methods.gates import ChannelGates, gated
from search.budget.macs import describe, model_macs
from search.budget.plan import Plan
from search.core.runtime import Runtime
from search.methods.similarity import redundancy, similarity_weights
from tests.acp_case import CONFIG, case
from tests.conftest import tiny_vit

CPU = Runtime(torch.device("cpu"))


def _plan(geometry, scores):
    return make_plan(geometry, scores, SolverConfig(CONFIG.budget, align=4, normalise=False), model="tiny", img_size=32, method="acp")


def test_a_duplicated_channel_gets_the_lowest_weight():
    torch.manual_seed(0)
    acts = torch.randn(1, 500, 16)
    acts[..., 9] = 2.0 * acts[..., 3] + 0.01 * torch.randn(1, 500)
    red = redundancy(acts)[0]
    assert set(red.topk(2).indices.tolist()) == {3, 9}


def test_similarity_weights_rank_a_duplicated_head_channel_last():
    model = tiny_vit(num_heads=2, embed_dim=32)
    with torch.no_grad():
        qkv = model.blocks[0].attn.qkv.weight
        v0 = 2 * 32
        qkv[v0 + 5] = qkv[v0 + 1] * 1.5
    geometry = describe(model)
    acts = capture(model, geometry, torch.randn(4, 3, 32, 32))
    w = similarity_weights(acts[0])
    assert int(w.v[0].argmin()) in (1, 5) and w.v.mean().item() == pytest.approx(1.0)


def test_attention_difference_gives_a_zeroed_channel_the_lowest_init():
    model = tiny_vit(num_heads=2, embed_dim=32)
    heads, d = 2, 16
    with torch.no_grad():
        qkv = model.blocks[0].attn.qkv
        qkv.weight[3] = 0
        qkv.weight[heads * d + 3] = 0
        qkv.bias[3] = qkv.bias[heads * d + 3] = 0
        qkv.weight[2 * heads * d + 7] = 0
        qkv.bias[2 * heads * d + 7] = 0
        model.blocks[0].mlp.fc1.weight[11] = 0
        model.blocks[0].mlp.fc1.bias[11] = 0
    geometry = describe(model)
    acts = capture(model, geometry, torch.randn(4, 3, 32, 32))
    diffs = attention_differences(model, 0, acts[0])
    assert diffs.qk[0, 3] == pytest.approx(0.0, abs=1e-10) and int(diffs.qk.flatten().argmin()) == 3
    assert int(diffs.v.flatten().argmin()) == 7 and int(diffs.mlp.argmin()) == 11
    logits = init_logits(model, acts)[0]
    assert logits.qk.flatten().argmin() == 3 and logits.mlp.min() < logits.mlp.max()


def test_attention_difference_matches_removing_the_channel_for_real():
    model = tiny_vit(num_heads=2, embed_dim=32, depth=1)
    geometry = describe(model)
    x = torch.randn(2, 3, 32, 32)
    acts = capture(model, geometry, x)
    diffs = attention_differences(model, 0, acts[0])
    block = model.blocks[0]
    tokens = block.norm1(model._pos_embed(model.patch_embed(x)))
    with torch.no_grad():
        base = block.attn(tokens)
        qkv = block.attn.qkv
        saved = qkv.weight[5].clone(), qkv.bias[5].clone()
        qkv.weight[5], qkv.bias[5] = 0, 0
        removed = block.attn(tokens)
        qkv.weight[5], qkv.bias[5] = saved
    assert diffs.qk[0, 5].item() == pytest.approx((removed - base).pow(2).sum().item(), rel=1e-3)


def test_expected_macs_equal_the_exact_count_at_hard_gates():
    model = tiny_vit(num_heads=4, embed_dim=64)
    geometry = describe(model)
    gates = ChannelGates(geometry, init_logit=50.0)
    assert gates.expected_macs().item() == pytest.approx(model_macs(geometry), rel=1e-9)
    with torch.no_grad():
        gates.mlp[0][:100] = -50.0
    dense = geometry.dense_widths()
    widths = (dataclasses.replace(dense[0], mlp=dense[0].mlp - 100),) + dense[1:]
    assert gates.expected_macs().item() == pytest.approx(model_macs(geometry, widths), rel=1e-9)


def test_closed_gates_equal_removed_channels():
    model = tiny_vit(num_heads=2, embed_dim=32)
    geometry = describe(model)
    gates = ChannelGates(geometry, init_logit=60.0)
    with torch.no_grad():
        gates.qk[0][1, 2] = -60.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), gated(model, gates):
        got = model(x)
        qkv = model.blocks[0].attn.qkv
        qkv.weight[16 + 2] = 0
        qkv.bias[16 + 2] = 0
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_search_is_deterministic_and_meets_the_budget():
    model, images = case()
    geometry = describe(model)
    first = acp_search(model, geometry, images, CONFIG, classifier=True, runtime=CPU).scores
    second = acp_search(model, geometry, images, CONFIG, classifier=True, runtime=CPU).scores
    for a, b in zip(first, second):
        assert torch.equal(a.qk, b.qk) and torch.equal(a.v, b.v) and torch.equal(a.mlp, b.mlp)
    plan = _plan(geometry, first)
    assert plan.pruned_macs <= CONFIG.budget * plan.dense_macs


def test_killed_search_loses_at_most_one_checkpoint_interval(tmp_path):
    model, images = case()
    geometry = describe(model)
    state = tmp_path / "search.pt"
    reference = acp_search(model, geometry, images, CONFIG, classifier=True, runtime=CPU).scores

    def die_at_7(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        acp_search(model, geometry, images, CONFIG, classifier=True, runtime=CPU, state_path=state, on_step=die_at_7)
    saved_step = torch.load(state, weights_only=True)["step"]
    assert 7 - saved_step < CONFIG.checkpoint_every and saved_step == 6
    steps_run = []
    resumed = acp_search(model, geometry, images, CONFIG, classifier=True, runtime=CPU, state_path=state, on_step=steps_run.append).scores
    assert steps_run == [7, 8]
    for a, b in zip(reference, resumed):
        for group in ("qk", "v", "mlp"):
            torch.testing.assert_close(getattr(a, group), getattr(b, group))
    assert _plan(geometry, resumed) == _plan(geometry, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_find_the_single_process_plan_each_on_its_own_shard(tmp_path):
    """Same plan as one process, and each rank trained on its half of every global batch only.

    The plan alone cannot show the sharding: ranks that each used the whole batch would average
    identical gradients and find the same plan. So the worker records the images each rank trained on.
    """
    model, images = case()
    geometry = describe(model)
    single = _plan(geometry, acp_search(model, geometry, images, CONFIG, classifier=True, runtime=CPU).scores)
    out = tmp_path / "ddp_plan.json"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(root / "tests" / "ddp_search_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Plan.load(out) == single
    seen = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]
    for rank, batches in enumerate(seen):
        assert len(batches) == CONFIG.steps
        for step, got in enumerate(batches):
            expected = batch_indices(len(images), CONFIG.batch_size, CONFIG.seed, step)[rank::2].tolist()
            assert got == expected, f"rank {rank} trained on {got} at step {step}, not its shard {expected}"
