"""Run by torchrun in tests/test_acp.py: the acp search on 2 gloo ranks, plan written by rank 0."""
from __future__ import annotations

import sys
from pathlib import Path

from search.acp import AcpConfig, acp_search
from search.allocate import SolverConfig, make_plan
from search.macs import describe
from search.core.runtime import runtime
from tests.acp_case import CONFIG, case

if __name__ == "__main__":
    model, images = case()
    geometry = describe(model)
    with runtime("cpu") as rt:
        assert rt.world_size == 2, "expected to run under torchrun with 2 processes"
        scores = acp_search(model, geometry, images, CONFIG, classifier=True, runtime=rt)
    if rt.is_main:
        plan = make_plan(geometry, scores, SolverConfig(CONFIG.budget, align=4, normalise=False), model="tiny", img_size=32, method="acp")
        Path(sys.argv[1]).write_text(plan.to_json())
