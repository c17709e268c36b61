"""Latency-budget rows: plan against a target's latency table, then measure what the plan predicted.

For every model, precision and batch: the target's table (timed, or reused from the cache), a plan
whose predicted latency meets the budget (magnitude scores, widths by the solver under the table,
``--align auto`` from the table), and the pruned model timed against the dense one on the same
target in one interleaved run: predicted against measured. ``make gpu-check`` runs it on
``torch-cuda`` (CUDA graphs) in fp16 and fp32 at batch 1, 32 and 256; the tests run the same code
on ``torch-cpu`` and ``ort`` with a tiny model.

    python -m exporter.bench.latency_budget_rows --target torch-cuda --models deit_b,dinov2_s
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from exporter.latency_model import TableSpec, latency_table
from exporter.latency_targets import resolve_target
from exporter.onnx_export import export_onnx
from exporter.stages.latency import measure_pair
from exporter.surgery import apply_plan
from search.budget.allocate import SolverConfig, make_plan
from search.core.atomic import atomic_path
from search.core.errors import BudgetError
from search.budget.cost import cost_ratio
from search.methods.importance import magnitude_scores
from search.models.load import OFFLINE_ENV, load_model


@dataclass(frozen=True)
class RowsConfig:
    """What the rows cover.

    Attributes:
        models: model names (aliases or timm names).
        target: ``--target-runtime`` name.
        precisions: fp32 and/or fp16.
        batches: batch sizes.
        budget: the latency budget.
        runs: interleaved rounds of the measurement.
        threads: CPU threads of CPU targets.
        spec: how much of the table is timed.
        checkpoint: weights for the models (random weights otherwise: latency does not depend on them).
    """

    models: tuple[str, ...] = ("deit_b", "dinov2_s")
    target: str = "torch-cuda"
    precisions: tuple[str, ...] = ("fp16", "fp32")
    batches: tuple[int, ...] = (1, 32, 256)
    budget: float = 0.63
    runs: int = 50
    threads: int = 1
    spec: TableSpec = TableSpec()
    checkpoint: Path | None = None


def latency_budget_rows(cfg: RowsConfig, cache: Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (model, precision, batch): predicted and measured ratio of a plan at ``cfg.budget``."""
    os.environ.setdefault(OFFLINE_ENV, "1")
    rows = []
    for name in cfg.models:
        loaded = load_model(name, cfg.checkpoint, random_init=cfg.checkpoint is None)
        model, geometry = loaded.model.eval(), loaded.geometry
        input_size = tuple(loaded.data_config["input_size"])
        scores = magnitude_scores(model)
        for precision in cfg.precisions:
            for batch in cfg.batches:
                from exporter.runtimes.ort import available_providers

                target = resolve_target(cfg.target, precision, batch, cfg.threads, cuda=torch.cuda.is_available(),
                                        ort_cuda="CUDAExecutionProvider" in available_providers())
                started = time.perf_counter()
                table, path, reused = latency_table(model, loaded.timm_name, input_size, geometry, target, cfg.spec, cache,
                                                    progress)
                table_s = time.perf_counter() - started
                row = {"model": name, "weights": loaded.weights, "random_weights": loaded.random_weights,
                       "target": target.describe(), "precision": precision, "batch": batch, "budget": cfg.budget,
                       "align": table.align, "table": str(path), "table_reused": reused, "table_seconds": table_s,
                       "additivity": table.additivity}
                try:
                    plan = make_plan(geometry, scores, SolverConfig(cfg.budget, align=table.align), model=loaded.timm_name,
                                     img_size=loaded.img_size, method="magnitude", cost=table)
                except BudgetError as err:  # e.g. batch 1 on a GPU, where launches, not widths, set the time
                    rows.append({**row, "unreachable": str(err)})
                    continue
                pruned = apply_plan(model, plan, geometry)
                with tempfile.TemporaryDirectory() as tmp:
                    paths = (None, None)
                    if target.runtime != "torch":
                        paths = (export_onnx(model, Path(tmp) / "dense.onnx", input_size),
                                 export_onnx(pruned, Path(tmp) / "pruned.onnx", input_size))
                    measured = measure_pair(target, (paths[0], model), (paths[1], pruned), input_size, cfg.runs,
                                            progress=progress)
                rows.append({**row, "mac_ratio": plan.mac_ratio, "predicted_ratio": cost_ratio(table, geometry, plan.widths()),
                             **measured, "widths": [[w.heads, w.qk, w.v, w.mlp] for w in plan.widths()]})
    return rows


def markdown_rows(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows as a Markdown table (for gpu.md and the CLI below)."""
    lines = ["| model | weights | target | precision | batch | align | MAC ratio | predicted | measured | ± |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "unreachable" in r:
            lines.append(f"| {r['model']} | {'random' if r['random_weights'] else 'real'} | {r['target']['label']} | "
                         f"{r['precision']} | {r['batch']} | {r['align']} | | unreachable | | |")
            continue
        lines.append(f"| {r['model']} | {'random' if r['random_weights'] else 'real'} | {r['target']['label']} | {r['precision']} "
                     f"| {r['batch']} | {r['align']} | {r['mac_ratio']:.3f} | {r['predicted_ratio']:.3f} | "
                     f"**{r['measured_ratio']:.3f}** | {r['noise']:.3f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="torch-cuda")
    parser.add_argument("--models", default="deit_b,dinov2_s")
    parser.add_argument("--precisions", default="fp16,fp32")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--budget", type=float, default=0.63)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/latency_budget_rows.json"))
    args = parser.parse_args(argv)
    cfg = RowsConfig(models=tuple(args.models.split(",")), target=args.target, precisions=tuple(args.precisions.split(",")),
                     batches=tuple(int(b) for b in args.batches.split(",")), budget=args.budget, threads=args.threads)
    rows = latency_budget_rows(cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print("\n".join(markdown_rows(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
