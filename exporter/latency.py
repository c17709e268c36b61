"""Time ONNX models against each other in ONNX Runtime, interleaved so drift cancels.

The figure we report is a ratio (pruned / dense). Timing one model after the other lets thermal
throttling, frequency scaling or a noisy neighbour bias the ratio; running every model once per
round, alternating the order each round, spreads any drift evenly over all of them.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort
import torch

from exporter.validate import CPU, make_session
from search.progress import progress_bar


@dataclass(frozen=True)
class LatencyResult:
    """Median latency per model from one interleaved run, and the settings it was taken with."""

    median_ms: dict[str, float]
    runs: int
    batch: int
    threads: int
    provider: str
    samples_ms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def ratio(self, num: str, den: str) -> float:
        """Median latency of ``num`` divided by that of ``den``."""
        for name in (num, den):
            if name not in self.median_ms:
                raise KeyError(f"no latency for {name!r}; measured {sorted(self.median_ms)}")
        return self.median_ms[num] / self.median_ms[den]


def _cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """The machine a timing was taken on, for reports: latency means nothing without it."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }


def measure_latency(
    models: Mapping[str, Path],
    batch: int,
    threads: int,
    runs: int = 30,
    warmup: int = 5,
    provider: str = CPU,
    input_size: tuple[int, int, int] = (3, 224, 224),
    seed: int = 0,
    progress: bool = True,
) -> LatencyResult:
    """Median wall time per model over ``runs`` interleaved rounds, after ``warmup`` runs each.

    All models get the same random input of shape (batch, *input_size) and a session from
    :func:`exporter.validate.make_session` with ``threads`` intra-op threads and no spinning.
    """
    if not models:
        raise ValueError("no models to time")
    if runs < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need runs >= 1, warmup >= 0, batch >= 1; got {runs}, {warmup}, {batch}")
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, *input_size), dtype=np.float32)
    sessions = {name: make_session(path, threads, provider) for name, path in models.items()}
    feeds = {name: {s.get_inputs()[0].name: sample} for name, s in sessions.items()}

    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])

    names = list(sessions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with progress_bar("timing", total=runs, enabled=progress) as advance:
        for round_index in range(runs):
            for name in names if round_index % 2 == 0 else reversed(names):
                start = time.perf_counter()
                sessions[name].run(None, feeds[name])
                samples[name].append((time.perf_counter() - start) * 1e3)
            advance()

    return LatencyResult(
        median_ms={name: statistics.median(times) for name, times in samples.items()},
        runs=runs,
        batch=batch,
        threads=threads,
        provider=provider,
        samples_ms={name: tuple(times) for name, times in samples.items()},
        machine=machine_info(),
    )
