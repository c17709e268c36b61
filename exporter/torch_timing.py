"""Runners that time PyTorch modules: eager on the CPU, CUDA graphs on a GPU.

On CUDA a small model at batch 1 spends more time launching kernels than running them; serving
code that cares about latency captures the forward into a CUDA graph and replays it, and so does
this timer, so that a latency budget on ``torch-cuda`` is measured the way it would be served.
Each runner does one forward and returns once the device is done (it synchronises), which is
what :func:`exporter.timing.interleave` needs to time it.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
GRAPH_WARMUP = 3  # forwards on a side stream before capture, as CUDA graph capture requires


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Within the block, PyTorch's CPU ops use ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_runner(module: nn.Module, sample: torch.Tensor, device: str, precision: str, graphs: bool) -> Callable[[], None]:
    """A callable that runs ``module`` once on ``sample`` on ``device`` (``cpu``, ``cuda``) and waits for it.

    The module is copied to the device in ``precision`` (fp32 or fp16) and put in eval mode; the
    caller's module is untouched. With ``graphs`` (CUDA only) the forward is captured once into a
    CUDA graph with a static input and every call replays it.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if graphs and not device.startswith("cuda"):
        raise ValueError("CUDA graphs need a CUDA device")
    dtype = DTYPES[precision]
    net = copy.deepcopy(module).eval().to(device=device, dtype=dtype)
    static = sample.to(device=device, dtype=dtype)
    cuda = device.startswith("cuda")

    if not graphs:
        def run() -> None:
            with torch.inference_mode():
                net(static)
            if cuda:
                torch.cuda.synchronize(device)

        return run

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(GRAPH_WARMUP):
            net(static)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        net(static)

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize(device)

    replay.graph = graph  # type: ignore[attr-defined]  # keeps the graph (and its memory pool) alive
    replay.net = net  # type: ignore[attr-defined]
    return replay
