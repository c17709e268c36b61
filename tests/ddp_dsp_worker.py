"""Run by torchrun in tests/test_dsp.py: the DSP search on 2 gloo ranks, the logits and heads written by rank 0."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from search.core.runtime import runtime
from search.methods.dsp import dsp_search
from search.budget.macs import describe
from tests.test_dsp import DDP_CONFIG, DDP_TARGET, ddp_case

if __name__ == "__main__":
    model, images = ddp_case()
    with runtime("cpu") as rt:
        assert rt.world_size == 2, "expected to run under torchrun with 2 processes"
        result = dsp_search(model, describe(model), images, DDP_TARGET, DDP_CONFIG, classifier=True, runtime=rt)
    if rt.is_main:
        Path(sys.argv[1]).write_text(json.dumps({"heads": result.heads, "scores": [s.tolist() for s in result.scores]}))
