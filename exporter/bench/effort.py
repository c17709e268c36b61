"""Effort bench: what each ``--effort`` level buys on the device at hand, in fidelity, accuracy and wall time.

The user's own command, run as they would run it: ``prune-export dinov2_s --budget B -o m.onnx`` at
the model's native 224 px, with and without ``--data``, at each effort level, on whatever device this
machine has (CUDA when torch sees one). Each row is timed from the start of the run to the written
file, export and validation included, and then measured the quality bench's way: k-NN top-1 (cosine,
k = 20, T = 0.07) on features of the written ONNX file in ONNX Runtime, with a bank from the
Fashion-MNIST training split and queries from its test split, which no row trained on. The fidelity
columns are the run's own report: the file against the dense model on the run's held-out images.

    python -m exporter.bench.effort                                  # every row on this device
    python -m exporter.bench.effort --only "default, built-in @ 0.63"  # one row
    python -m exporter.bench.effort --render                         # rewrite effort.md/.png from effort.json

Rows are kept in artifacts/bench/effort.json by name and device, so a CPU run and a GPU run add to
one table. A row that exists is not run again unless named with ``--only``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from exporter.bench.quality import knn_of, matches_row
from exporter.bench.figures import pyplot, save_png
from exporter.timing import machine_info
from exporter.pipeline import RunConfig, run
from exporter.stages.effort import EFFORTS, resolve_effort
from search.core.atomic import atomic_path
from search.images.folders import image_folder, stack_images
from search.images.fashion_mnist import write_image_folder
from search.models.load import load_model

OUT = Path("artifacts/bench")
CACHE = Path(".cache/effort-bench")
IMG_SIZE = 224
BUDGETS = (0.63, 0.5)
TRAIN_PER_CLASS = 300
BANK_PER_CLASS = 100
TEST_PER_CLASS = 100


@dataclass(frozen=True)
class Row:
    """One run: an effort level, with or without --data, at one budget."""

    effort: str
    data: bool
    budget: float

    @property
    def name(self) -> str:
        return f"{self.effort}, {'--data' if self.data else 'built-in'} @ {self.budget:g}"


def rows() -> list[Row]:
    """Every effort level with and without data at each budget, the user's case (no data, 0.63) first."""
    return [Row(e, d, b) for b in BUDGETS for d in (False, True) for e in EFFORTS]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=None, help="run only rows matching this (see quality --only)")
    parser.add_argument("--render", action="store_true", help="rewrite effort.md and .png from effort.json")
    args = parser.parse_args(argv)
    stored = _load()
    if args.render:
        write_outputs(stored)
        return 0
    os.environ.setdefault("PRUNE_EXPORT_OFFLINE", "1")
    console = Console(stderr=True)
    device = _device()
    root = Path(".cache/fashion-mnist")
    train_dir = write_image_folder("train", root / f"train{TRAIN_PER_CLASS}", TRAIN_PER_CLASS, seed=0)
    bank_dir = write_image_folder("train", root / f"bank{BANK_PER_CLASS}", BANK_PER_CLASS, seed=1)
    test_dir = write_image_folder("test", root / f"test{TEST_PER_CLASS}", TEST_PER_CLASS, seed=0)
    config = load_model("dinov2_s", img_size=IMG_SIZE).data_config
    bank, test = stack_images(image_folder(bank_dir, config)), stack_images(image_folder(test_dir, config))
    threads = len(os.sched_getaffinity(0))
    CACHE.mkdir(parents=True, exist_ok=True)
    results = stored["rows"]
    dense_key = f"dense/{device}"
    if dense_key not in {f"{r['row']}/{r['device']}" for r in results}:
        run(RunConfig("dinov2_s", 1.0, CACHE / "dense.onnx", latency_runs=0), console)
        results.append({"row": "dense", "device": device, "budget": 1.0, "knn_top1": knn_of(CACHE / "dense.onnx", bank, test, threads)})
        _save(stored)
    done = {f"{r['row']}/{r['device']}" for r in results}
    for row in rows():
        named = args.only is not None and any(matches_row(o, row.name) for o in args.only)
        if (args.only is not None and not named) or (args.only is None and f"{row.name}/{device}" in done):
            continue
        out = CACHE / f"{device}-{row.effort}-{'data' if row.data else 'builtin'}-{row.budget:g}.onnx"
        cfg = RunConfig("dinov2_s", row.budget, out, effort=row.effort, data=train_dir if row.data else None, latency_runs=0)
        shutil.rmtree(cfg.work_dir, ignore_errors=True)  # a row is timed from scratch, never resumed
        load = os.getloadavg()[0]
        start = time.perf_counter()
        report = run(cfg, console)
        wall = time.perf_counter() - start
        effort = resolve_effort(row.effort, device)
        result = {
            "row": row.name, "device": device, "effort": row.effort, "data": row.data, "budget": row.budget,
            "wall_s": wall, "load_at_start": load, "load_at_end": os.getloadavg()[0],
            "search_steps": effort.search_steps, "finetune_steps": effort.finetune_steps,
            "images": effort.search_images, "batch": effort.batch_size,
            "mac_ratio": report["macs"]["onnx_ratio"], "knn_top1": knn_of(out, bank, test, threads),
            "fidelity": report["fidelity"], "stage_seconds": report["stage_seconds"],
        }
        results[:] = [r for r in results if not (r["row"] == row.name and r["device"] == device)] + [result]
        _save(stored)
        console.print(f"[bold]{row.name}[/] on {device}: k-NN {result['knn_top1']:.4f}, {wall:.0f} s")
    return 0


def _load() -> dict[str, Any]:
    path = OUT / "effort.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"meta": {}, "rows": []}


def _save(stored: dict[str, Any]) -> None:
    stored["meta"] = {
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": f"dinov2_s (real DINOv2 ViT-S/14 weights) at {IMG_SIZE} px",
        "protocol": f"k-NN top-1 (cosine, k=20, T=0.07) of the written ONNX in ONNX Runtime CPU; bank {BANK_PER_CLASS}/class "
                    f"from Fashion-MNIST train, queries {TEST_PER_CLASS}/class from its test split; --data rows search and "
                    f"recover on {TRAIN_PER_CLASS}/class train images (a separate draw from the bank)",
        "machine": machine_info(),
    }
    write_outputs(stored)


def write_outputs(stored: dict[str, Any]) -> None:
    """artifacts/bench/effort.{json,md,png}."""
    OUT.mkdir(parents=True, exist_ok=True)
    with atomic_path(OUT / "effort.json") as tmp:
        tmp.write_text(json.dumps(stored, indent=2) + "\n")
    meta, results = stored["meta"], stored["rows"]
    lines = [
        "# Effort bench: what each --effort level buys",
        "",
        f"- {meta.get('model')}; {meta.get('protocol')}",
        f"- machine: {meta.get('machine', {}).get('cpu_model')}, {meta.get('machine', {}).get('cpu_count')} CPUs; updated {meta.get('updated')}",
        "- wall: from the start of the run to the written file, export, parity and fidelity included (latency skipped); "
        "the load average at the start and end says whether the machine was shared",
        "- fidelity (the run's report, on its own held-out images): feature cosine to dense, share of k-NN neighbours kept, "
        "relation agreement",
        "- reproduce: `python -m exporter.bench.effort` (rows already in effort.json for this device are kept)",
        "",
        "| row | device | steps (search/recovery), images, batch | wall | load | MAC ratio | k-NN top-1 | vs dense | "
        "cosine | neighbours | relations |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense = {r["device"]: r["knn_top1"] for r in results if r["row"] == "dense"}
    for r in results:
        if r["row"] == "dense":
            lines.append(f"| dense | {r['device']} | | | | 1.0000 | {100 * r['knn_top1']:.1f}% | | | | |")
            continue
        f = r["fidelity"]
        vs = "" if r["device"] not in dense else f"{100 * (r['knn_top1'] - dense[r['device']]):+.1f}"
        lines.append(
            f"| {r['row']} | {r['device']} | {r['search_steps']}/{r['finetune_steps']}, {r['images']}, {r['batch']} | "
            f"{r['wall_s'] / 60:.1f} min | {r['load_at_start']:.1f}→{r['load_at_end']:.1f} | {r['mac_ratio']:.4f} | "
            f"{100 * r['knn_top1']:.1f}% | {vs} | {f['feature_cosine']:.4f} | {f['knn_agreement']:.3f} | {f['relation_agreement']:.4f} |"
        )
    with atomic_path(OUT / "effort.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot(results, dense, OUT / "effort.png")


def plot(results: list[dict[str, Any]], dense: dict[str, float], path: Path) -> None:
    """k-NN points against dense over wall minutes, one series per (device, data, budget)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    series: dict[str, list[tuple[float, float, str]]] = {}
    for r in results:
        if r["row"] == "dense" or r["device"] not in dense:
            continue
        key = f"{r['device']}, {'--data' if r['data'] else 'built-in'} @ {r['budget']:g}"
        series.setdefault(key, []).append((r["wall_s"] / 60, 100 * (r["knn_top1"] - dense[r["device"]]), r["effort"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("wall time of the run (minutes, log scale)")
    ax.set_ylabel("k-NN top-1 vs dense (points)")
    ax.set_title("dinov2_s at 224 px: accuracy bought by --effort")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    save_png(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
