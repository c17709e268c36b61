"""The parity and latency stages of a run, once per selected runtime, and their part of the report.

The pipeline calls these with its stage printer, so adding a runtime adds no branch there: each
runtime checks the same graph against the same PyTorch model, and times the shipped file against
the dense graph in its own interleaved run, so every ratio compares like with like.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch

from exporter.timing import measure_latency
from exporter.runtimes import InferenceRuntime, get_runtime
from exporter.parity import ParityResult, check_parity

StagePrinter = Callable[[str], ContextManager[list[str]]]


def _device_label(backend: InferenceRuntime, device: str) -> str:
    # ONNX Runtime keeps the stage names it always had ("latency CPU batch 1").
    short = device.removesuffix("ExecutionProvider")
    return short if backend.NAME == "ort" else f"{backend.LABEL} {short}"


def parity_per_runtime(
    stage: StagePrinter, runtimes: Sequence[str], onnx_path: Path, model: torch.nn.Module, inputs: torch.Tensor,
    classifier: bool,
) -> dict[str, ParityResult]:
    """:func:`exporter.parity.check_parity` of ``onnx_path`` in each runtime, one stage each.

    Raises the first ParityError met, so a file that fails in any runtime is never written.
    """
    results: dict[str, ParityResult] = {}
    for name in runtimes:
        with stage(f"parity in {get_runtime(name).LABEL}") as notes:
            result = check_parity(onnx_path, model, inputs, classifier=classifier, runtime=name)
            notes.append(f"max |Δ| {result.max_abs_diff:.2e}, cosine {result.min_cosine:.6f}")
        results[name] = result
    return results


def latency_per_runtime(
    stage: StagePrinter, runtimes: Sequence[str], models: Mapping[str, Path], batches: Sequence[int], threads: int,
    runs: int, input_size: tuple[int, int, int], seed: int,
) -> dict[str, list[dict[str, Any]]]:
    """Pruned-against-dense latency in each runtime, on each of its latency devices and batches.

    ``models`` must hold "dense" and "pruned". Each entry is the :class:`LatencyResult` as a dict
    plus "ratio" (pruned / dense).
    """
    entries: dict[str, list[dict[str, Any]]] = {}
    for name in runtimes:
        backend = get_runtime(name)
        entries[name] = []
        for device in backend.latency_devices():
            for batch in batches:
                with stage(f"latency {_device_label(backend, device)} batch {batch}") as notes:
                    result = measure_latency(
                        models, batch=batch, threads=threads, runs=runs, provider=device, input_size=input_size,
                        seed=seed, runtime=name,
                    )
                    entry = {**asdict(result), "ratio": result.ratio("pruned", "dense")}
                    notes.append(f"ratio {entry['ratio']:.3f}")
                entries[name].append(entry)
    return entries


def runtimes_report(
    parities: Mapping[str, ParityResult], latencies: Mapping[str, list[dict[str, Any]]], parity_notes: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """The report's "runtimes" section: per runtime, its label, version, parity and latency.

    ``parity_notes`` (inputs, reference, graph) are added to every runtime's parity figures.
    """
    section: dict[str, dict[str, Any]] = {}
    for name, parity in parities.items():
        backend = get_runtime(name)
        section[name] = {
            "label": backend.LABEL,
            "version": backend.version(),
            "parity": {**asdict(parity), **parity_notes},
            "latency": list(latencies.get(name, [])),
        }
    return section
