"""Check a latency-budget run's file against a plain dense export: one interleaved run, medians.

    python -m exporter.bench.latency_check m.onnx --model deit_b [--random-init] [--runs 100]

Times ``m.onnx``, the run's own dense export (``m.work/dense.onnx``) and a plain
``torch.onnx.export`` of the dense model (opset 17, no onnxsim: what a user would ship without this
tool) in ONE interleaved run on ONNX Runtime's CPU provider (batch 1, ``--threads`` threads,
spinning off), and puts the ratios (ratio of medians; per-round paired ratios with their quartiles
and the two halves of the run) beside what the run's report predicted and measured. Writes
``latency_check.json`` next to ``m.onnx`` (or ``--out``), with the machine and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from exporter.bench.latency_artifacts import plain_export
from exporter.timing import LatencyResult, machine_info, measure_latency
from search.core.atomic import atomic_path
from search.models.load import OFFLINE_ENV, load_model


def paired(result: LatencyResult, num: str, den: str) -> dict[str, float]:
    """Per-round ratios num/den: median, quartiles, and the medians of the first and second half of the run."""
    ratios = [a / b for a, b in zip(result.samples_ms[num], result.samples_ms[den])]
    q = statistics.quantiles(ratios, n=4)
    half = len(ratios) // 2
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2],
            "first_half": statistics.median(ratios[:half]), "second_half": statistics.median(ratios[half:])}


def check(onnx_path: Path, model: str, random_init: bool, runs: int, threads: int) -> dict[str, Any]:
    """The figures of one check (see the module docstring)."""
    os.environ.setdefault(OFFLINE_ENV, "1")
    loaded = load_model(model, random_init=random_init)
    input_size = tuple(loaded.data_config["input_size"])
    plain = plain_export(loaded.model, onnx_path.with_suffix(".work") / "plain-dense.onnx", input_size)
    files = {"plain": plain, "dense-export": onnx_path.with_suffix(".work") / "dense.onnx", "pruned": onnx_path}
    load = os.getloadavg()
    result = measure_latency(files, batch=1, threads=threads, runs=runs, warmup=3, input_size=input_size)
    section = json.loads(onnx_path.with_suffix(".json").read_text()).get("latency_model", {})
    return {
        "command": f"python -m exporter.bench.latency_check {onnx_path} --model {model}"
                   + (" --random-init" if random_init else "") + f" --runs {runs} --threads {threads}",
        "runs": runs, "threads": threads, "load_average": {"start": list(load), "end": list(os.getloadavg())},
        "median_ms": result.median_ms,
        "ratio_of_medians": {"pruned/plain": result.ratio("pruned", "plain"), "pruned/dense-export": result.ratio("pruned", "dense-export"),
                             "dense-export/plain": result.ratio("dense-export", "plain")},
        "paired": {"pruned/plain": paired(result, "pruned", "plain"), "pruned/dense-export": paired(result, "pruned", "dense-export")},
        "report": {k: section.get(k) for k in ("budget", "predicted_ratio", "measured_ratio", "noise", "correction", "miss")},
        "settings": result.settings, "machine": machine_info(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    figures = check(args.onnx, args.model, args.random_init, args.runs, args.threads)
    out = args.out or args.onnx.with_name("latency_check.json")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(figures, indent=1, default=str) + "\n")
    print(json.dumps({k: figures[k] for k in ("ratio_of_medians", "paired", "report", "load_average")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
