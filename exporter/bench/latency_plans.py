"""Latency of plans the CLI makes, real-weight and random-weight, against a plain dense timm export.

The latency bench (``exporter.bench.latency``) times plan shapes chosen by magnitude on random
weights, which keep most of the MLP; acp on real weights cuts the MLP far more. This bench runs the
pipeline itself for each row (so the shape is what a user gets, latency budgets with their
correction round included) and times every row's pruned graph against a plain
``torch.onnx.export`` of the dense model in ONE interleaved run per model (ORT CPU, batch 1,
spinning off). Every row says whether its weights are real or random, and the machine (CPU model
and instruction sets) is in the table.

Rows (``ROWS``): deit_b on random weights (magnitude, the default there) at MAC budget 0.63 and
latency budget 0.6; dinov2_s on its real weights with acp at 0.5 and 0.63, MAC and latency
budgets, searched on the built-in photographs (no --data; 160 search images instead of 256) with
fewer search steps than the CLI's 40 (``--search-steps``; the table says how many) and no
recovery, which changes no width.

    python -m exporter.bench.latency_plans [--only dinov2_s] [--search-steps 10] [--runs 30]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from exporter.bench.latency_artifacts import plain_export
from exporter.timing import machine_info, measure_latency
from exporter.machine import describe_cpu
from exporter.pipeline import RunConfig, run
from search.core.atomic import atomic_path
from search.models.load import OFFLINE_ENV, load_model

OUT = Path("artifacts/bench")
WORK = Path(".cache/latency-plans")
PLAIN = "plain dense export"
SEARCH_IMAGES, HELDOUT_IMAGES = 160, 16
"""Enough built-in crops for ten search steps of 16 images and the parity check: widths, not accuracy, are measured here."""


@dataclass(frozen=True)
class PlanRow:
    """One row: a model, a method, and a MAC or a latency budget."""

    model: str
    method: str
    budget: float
    latency: bool

    @property
    def name(self) -> str:
        return f"{self.model} {self.method} @ {'latency' if self.latency else 'MACs'} {self.budget:g}"


ROWS = (
    PlanRow("deit_b", "magnitude", 0.63, latency=False),
    PlanRow("deit_b", "magnitude", 0.6, latency=True),
    PlanRow("dinov2_s", "acp", 0.63, latency=False),
    PlanRow("dinov2_s", "acp", 0.63, latency=True),
    PlanRow("dinov2_s", "acp", 0.5, latency=False),
    PlanRow("dinov2_s", "acp", 0.5, latency=True),
)


def run_row(row: PlanRow, search_steps: int, threads: int, console: Console) -> dict[str, Any]:
    """Run the pipeline for ``row``; its report figures and the pruned graph's path."""
    out = WORK / f"{row.name.replace(' ', '_').replace('@', 'at')}.onnx"
    cfg = RunConfig(row.model, row.budget, out, method=row.method, random_init=row.model != "dinov2_s",
                    latency_budget=row.budget if row.latency else None, target_runtime="ort", threads=threads,
                    search_steps=search_steps, finetune_steps=0, search_images=SEARCH_IMAGES, heldout_images=HELDOUT_IMAGES)
    started = time.perf_counter()
    report = run(cfg, console)
    section = report.get("latency_model", {})
    return {"row": row.name, "model": row.model, "method": row.method, "budget_kind": "latency" if row.latency else "MACs",
            "budget": row.budget, "weights": "random" if report["model"]["random_weights"] else f"real ({report['model']['weights']})",
            "search_steps": search_steps if row.method == "acp" else None, "seconds": time.perf_counter() - started,
            "mac_ratio": report["macs"]["ratio"], "predicted_ratio": section.get("predicted_ratio"),
            "pipeline_measured_ratio": section.get("measured_ratio"), "correction": section.get("correction"),
            "miss": section.get("miss"), "align": report["plan"]["align"],
            "widths": [[b["heads"], b["qk"], b["v"], b["mlp"]] for b in report["blocks"]],
            "path": str(cfg.work_dir / "pruned.onnx")}


def time_rows(model: str, rows: list[dict[str, Any]], threads: int, runs: int) -> dict[str, Any]:
    """The rows of one model and its plain dense export, one interleaved run at batch 1."""
    os.environ.setdefault(OFFLINE_ENV, "1")
    loaded = load_model(model, random_init=model != "dinov2_s")
    input_size = tuple(loaded.data_config["input_size"])
    plain = plain_export(loaded.model, WORK / f"{model}-plain.onnx", input_size)
    files = {PLAIN: plain, **{r["row"]: Path(r["path"]) for r in rows}}
    result = measure_latency(files, batch=1, threads=threads, runs=runs, warmup=3, input_size=input_size)
    for r in rows:
        r["ms"] = result.median_ms[r["row"]]
        r["ratio_to_plain"] = result.ratio(r["row"], PLAIN)
        r["paired_to_plain"] = _paired_ratios_plain(result, r["row"])
    return {"plain_ms": result.median_ms[PLAIN], "runs": runs, "settings": result.settings}


def _paired_ratios_plain(result: Any, name: str) -> dict[str, float]:
    ratios = [a / b for a, b in zip(result.samples_ms[name], result.samples_ms[PLAIN])]
    q = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Latency of the CLI's plans against a plain dense export (ORT CPU, batch 1)", "",
             f"- machine: {describe_cpu(report['machine'])}; onnxruntime {report['machine'].get('onnxruntime')}; "
             f"{report['threads']} threads, spinning off; load average at start {report['load_average']}",
             f"- created {report['created']}; reproduce: `{report['command']}`",
             "- each model's rows and its plain `torch.onnx.export` (opset 17, no onnxsim) are timed in ONE interleaved run; "
             "`predicted` is the latency table's ratio to the pipeline's own dense export, `pipeline` the run's own "
             "measurement of the same, `vs plain` the ratio of medians to the plain export (paired per-round quartiles)", ""]
    for model, timing in report["timings"].items():
        lines += [f"## {model} (plain export {timing['plain_ms']:.1f} ms, {timing['runs']} rounds)", "",
                  "| row | weights | search steps | align | MAC ratio | predicted | pipeline | vs plain | paired q1-q3 | note |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in (r for r in report["rows"] if r["model"] == model):
            fmt = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
            note = "MISSED: " + r["miss"] if r.get("miss") else ("corrected once" if r.get("correction") else "")
            lines.append(f"| {r['row']} | {r['weights']} | {r['search_steps'] or ''} | {r['align']} | {r['mac_ratio']:.3f} | "
                         f"{fmt(r['predicted_ratio'])} | {fmt(r['pipeline_measured_ratio'])} | **{r['ratio_to_plain']:.3f}** | "
                         f"{r['paired_to_plain']['q1']:.3f}-{r['paired_to_plain']['q3']:.3f} | {note} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="rows whose name contains this (repeatable)")
    parser.add_argument("--search-steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    os.environ.setdefault(OFFLINE_ENV, "1")
    console = Console(stderr=True)
    WORK.mkdir(parents=True, exist_ok=True)
    selected = [r for r in ROWS if not args.only or any(o in r.name for o in args.only)]
    report: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "command": "python -m exporter.bench.latency_plans " + " ".join(argv or []),
                              "machine": machine_info(), "threads": args.threads,
                              "load_average": [round(x, 1) for x in os.getloadavg()], "rows": [], "timings": {}}
    for row in selected:
        report["rows"].append(run_row(row, args.search_steps, args.threads, console))
    for model in dict.fromkeys(r.model for r in selected):
        report["timings"][model] = time_rows(model, [r for r in report["rows"] if r["model"] == model], args.threads, args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "latency_plans.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    with atomic_path(args.out / "latency_plans.md") as tmp:
        tmp.write_text(markdown(report))
    Console().print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
