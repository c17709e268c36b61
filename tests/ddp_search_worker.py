"""Run by torchrun in tests/test_acp.py: the acp search on 2 gloo ranks, plan written by rank 0.

Every rank also records which pool images each training forward (the student's, the one with
gradients) saw, so the test can check that a rank trains on its shard of the global batch only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from search.methods.acp import acp_search
from search.budget.allocate import SolverConfig, make_plan
from search.budget.macs import describe
from search.core.runtime import runtime
from tests.acp_case import CONFIG, case


def record_batches(model: torch.nn.Module, pool: torch.Tensor, seen: list[list[int]]) -> None:
    """Append the pool indices of every batch the model's patch embedding sees with gradients enabled."""
    def hook(_module: torch.nn.Module, inputs: tuple) -> None:
        if torch.is_grad_enabled():
            seen.append([int((pool - image).abs().flatten(1).sum(1).argmin()) for image in inputs[0]])

    model.patch_embed.register_forward_pre_hook(hook)


if __name__ == "__main__":
    model, images = case()
    geometry = describe(model)
    seen: list[list[int]] = []
    record_batches(model, images, seen)
    with runtime("cpu") as rt:
        assert rt.world_size == 2, "expected to run under torchrun with 2 processes"
        scores = acp_search(model, geometry, images, CONFIG, classifier=True, runtime=rt).scores
    out = Path(sys.argv[1])
    out.with_suffix(f".rank{rt.rank}.json").write_text(json.dumps(seen))
    if rt.is_main:
        plan = make_plan(geometry, scores, SolverConfig(CONFIG.budget, align=4, normalise=False), model="tiny", img_size=32, method="acp")
        out.write_text(plan.to_json())
