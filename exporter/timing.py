"""Time ONNX models against each other in one inference runtime, interleaved so drift cancels.

The figure we report is a ratio (pruned / dense). Timing one model after the other lets thermal
throttling, frequency scaling or a noisy neighbour bias the ratio; running every model once per
round, alternating the order each round, spreads any drift evenly over all of them. The runtime
(ONNX Runtime by default, or OpenVINO) comes from :mod:`exporter.runtimes`; every model of one run
gets a session with the same settings.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch

from exporter.machine import cpu_identity
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


def machine_info(runtimes: Sequence[str] = ()) -> dict[str, Any]:
    """The machine a timing was taken on, for reports: latency means nothing without it.

    The CPU model and its instruction sets (AVX2, AVX-512, VNNI, AMX: ``exporter.machine``), the
    cores, and ONNX Runtime's version always; ``runtimes`` adds the versions of others (openvino).
    """
    return {
        **cpu_identity(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        **runtime_versions(runtimes),
        "torch": torch.__version__,
    }


def _warm_up(runners: Mapping[str, Callable[[], Any]], runs: int, warmup: int) -> None:
    """Check the round counts, then call every runner ``warmup`` times, untimed."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0; got {runs}, {warmup}")
    for run in runners.values():
        for _ in range(warmup):
            run()


def interleave(
    runners: Mapping[str, Callable[[], Any]], runs: int, warmup: int = 5, progress: bool = True, title: str = "timing",
) -> dict[str, list[float]]:
    """Wall time (ms) of every runner over ``runs`` rounds, each round running every runner once.

    The order alternates each round (forwards, then backwards), so drift over the run lands evenly
    on all of them. ``warmup`` calls of each come first and are not timed. A runner must finish
    its work before it returns (a GPU runner synchronises).
    """
    _warm_up(runners, runs, warmup)
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with progress_bar(title, total=runs, enabled=progress) as advance:
        for round_index in range(runs):
            for name in names if round_index % 2 == 0 else reversed(names):
                start = time.perf_counter()
                runners[name]()
                samples[name].append((time.perf_counter() - start) * 1e3)
            advance()
    return samples


def interleave_paired(
    runners: Mapping[str, Callable[[], Any]], reference: Mapping[str, str], runs: int, warmup: int = 3,
    progress: bool = True, title: str = "timing",
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per round, every runner right beside its reference: the ratio of each pair, and every reference timing.

    On a shared machine a noisy neighbour slows whatever runs while it is busy; two runs a few
    milliseconds apart are slowed alike, two runs seconds apart are not. So each runner in
    ``reference`` (name → the name of its reference runner) is timed in a pair with its reference,
    in alternating order, and what is kept is their ratio. Every runner that is a reference is
    timed once per pair it is in; its samples are returned too, to turn ratios back into ms.

    Returns (ratios by runner, reference timings in ms by reference name).
    """
    _warm_up(runners, runs, warmup)
    names = list(reference)
    ratios: dict[str, list[float]] = {name: [] for name in names}
    bases: dict[str, list[float]] = {ref: [] for ref in set(reference.values())}

    def timed(name: str) -> float:
        start = time.perf_counter()
        runners[name]()
        return (time.perf_counter() - start) * 1e3

    with progress_bar(title, total=runs, enabled=progress) as advance:
        for round_index in range(runs):
            for i, name in enumerate(names if round_index % 2 == 0 else reversed(names)):
                ref = reference[name]
                if (i + round_index) % 2 == 0:
                    base, ms = timed(ref), timed(name)
                else:
                    ms, base = timed(name), timed(ref)
                ratios[name].append(ms / base)
                bases[ref].append(base)
            advance()
    return ratios, bases


def median_noise(samples: Sequence[float]) -> float:
    """Uncertainty of a median of ``samples``: 1.58 × interquartile range / √n (the notch of a box plot)."""
    if len(samples) < 4:
        return float("inf")
    q = statistics.quantiles(samples, n=4)
    return 1.58 * (q[2] - q[0]) / len(samples) ** 0.5


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
    intra-op threads and no spinning (:func:`exporter.parity.make_session`), in OpenVINO
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
    samples = interleave({name: (lambda s=session: s.run(sample)) for name, session in sessions.items()}, runs, warmup, progress)

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
