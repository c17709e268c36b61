"""Time ONNX models against each other in one inference runtime, interleaved so drift cancels.

The figure we report is a ratio (pruned / dense). Timing one model after the other lets thermal
throttling, frequency scaling or a noisy neighbour bias the ratio; running every model once per
round, alternating the order each round, spreads any drift evenly over all of them. The runtime
(ONNX Runtime by default, or OpenVINO) comes from :mod:`exporter.runtimes`; every model of one run
gets a session with the same settings.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch

from exporter.runtimes import get_runtime, runtime_versions
from search.core.progress import progress_bar


@dataclass(frozen=True)
class LatencyResult:
    """Median latency per model from one interleaved run, and the settings it was taken with."""

    median_ms: dict[str, float]
    runs: int
    batch: int
    threads: int
    provider: str  # the runtime's device: an ORT execution provider, or an OpenVINO device
    samples_ms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    runtime: str = "ort"
    settings: dict[str, Any] = field(default_factory=dict)  # as the runtime reports them

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


def machine_info(runtimes: Sequence[str] = ()) -> dict[str, Any]:
    """The machine a timing was taken on, for reports: latency means nothing without it.

    ONNX Runtime's version is always given; ``runtimes`` adds the versions of others (openvino).
    """
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
        **runtime_versions(runtimes),
        "torch": torch.__version__,
    }


def measure_latency(
    models: Mapping[str, Path],
    batch: int,
    threads: int,
    runs: int = 30,
    warmup: int = 5,
    provider: str | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
    seed: int = 0,
    progress: bool = True,
    runtime: str = "ort",
) -> LatencyResult:
    """Median wall time per model over ``runs`` interleaved rounds, after ``warmup`` runs each.

    All models get the same random input of shape (batch, *input_size) and a session of
    ``runtime`` on ``provider`` (its CPU when None) with ``threads`` threads: in ONNX Runtime
    intra-op threads and no spinning (:func:`exporter.validate.make_session`), in OpenVINO
    INFERENCE_NUM_THREADS with the latency hint (:mod:`exporter.runtimes.openvino`).

    Raises:
        UnknownRuntimeError, RuntimeUnavailableError: ``runtime`` is unknown or not installed.
    """
    if not models:
        raise ValueError("no models to time")
    if runs < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need runs >= 1, warmup >= 0, batch >= 1; got {runs}, {warmup}, {batch}")
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, *input_size), dtype=np.float32)
    backend = get_runtime(runtime)
    device = provider or backend.CPU_DEVICE
    sessions = {name: backend.load(path, threads, device) for name, path in models.items()}

    for session in sessions.values():
        for _ in range(warmup):
            session.run(sample)

    names = list(sessions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with progress_bar("timing", total=runs, enabled=progress) as advance:
        for round_index in range(runs):
            for name in names if round_index % 2 == 0 else reversed(names):
                start = time.perf_counter()
                sessions[name].run(sample)
                samples[name].append((time.perf_counter() - start) * 1e3)
            advance()

    return LatencyResult(
        median_ms={name: statistics.median(times) for name, times in samples.items()},
        runs=runs,
        batch=batch,
        threads=threads,
        provider=device,
        samples_ms={name: tuple(times) for name, times in samples.items()},
        machine=machine_info((backend.NAME,)),
        runtime=backend.NAME,
        settings=next(iter(sessions.values())).settings,
    )
