"""Effort bench: what each ``--effort`` level buys on the device at hand, in fidelity, accuracy and wall time.

The user's own command, run as they would run it: ``prune-export dinov2_s --budget B -o m.onnx`` at
the model's native 224 px, with and without ``--data``, at each effort level, on whatever device this
machine has (CUDA when torch sees one). Each row is timed from the start of the run to the written
file, export and validation included, and then measured the quality bench's way: k-NN top-1 (cosine,
k = 20, T = 0.07) on features of the written ONNX file in ONNX Runtime, on two labelled real datasets
no row trained on: a bank from the Fashion-MNIST training split with queries from its test split, and
scikit-learn's handwritten digits (``exporter.bench.digits``). The fidelity columns, which lead, are the
run's own report: the file against the dense model on the run's held-out images. A k-NN figure above
dense after recovery on other images is adaptation, not preservation.

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

from exporter.bench.digits import BANK_PER_CLASS as DIGIT_BANK, QUERIES_PER_CLASS as DIGIT_QUERIES, write_digit_folders
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


BEFORE_COMPENSATION = " [before compensation]"
"""Suffix of the rows measured before compensation existed (other effort levels: recovery did the repair)."""


@dataclass(frozen=True)
class Row:
    """One run: an effort level, with or without --data, at one budget, with or without compensation."""

    effort: str
    data: bool
    budget: float
    compensate: bool = True

    @property
    def name(self) -> str:
        return f"{self.effort}, {'--data' if self.data else 'built-in'} @ {self.budget:g}" + ("" if self.compensate else ", no compensation")


def rows() -> list[Row]:
    """Every effort level with and without data at each budget, the user's case (no data, 0.63) first; then
    the fast level without compensation (on the CPU: the plain cut) as the ablation."""
    return [Row(e, d, b) for b in BUDGETS for d in (False, True) for e in EFFORTS] + [Row("fast", False, b, False) for b in BUDGETS]


def _machine() -> str:
    """The machine a row ran on, as the table names it: wall times compare only within one machine."""
    info = machine_info()
    return f"{info.get('cpu_model')}, {info.get('cpu_count')} CPUs"


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
    digit_bank, digit_queries = (stack_images(image_folder(d, config)) for d in write_digit_folders(Path(".cache/digits")))

    def knn_both(path: Path) -> dict[str, float]:
        return {"knn_top1": knn_of(path, bank, test, threads), "knn_digits": knn_of(path, digit_bank, digit_queries, threads)}

    threads = len(os.sched_getaffinity(0))
    CACHE.mkdir(parents=True, exist_ok=True)
    results = stored["rows"]
    dense_key = f"dense/{device}"
    dense_row = next((r for r in results if f"{r['row']}/{r['device']}" == dense_key), None)
    if dense_row is None or "knn_digits" not in dense_row:
        if not (CACHE / "dense.onnx").is_file():
            run(RunConfig("dinov2_s", 1.0, CACHE / "dense.onnx", latency_runs=0), console)
        results[:] = [r for r in results if f"{r['row']}/{r['device']}" != dense_key]
        results.insert(0, {"row": "dense", "device": device, "budget": 1.0, **knn_both(CACHE / "dense.onnx")})
        _save(stored)
    done = {f"{r['row']}/{r['device']}" for r in results}
    for row in rows():
        named = args.only is not None and any(matches_row(o, row.name) for o in args.only)
        if (args.only is not None and not named) or (args.only is None and f"{row.name}/{device}" in done):
            continue
        out = CACHE / f"{device}-{row.effort}-{'data' if row.data else 'builtin'}-{row.budget:g}.onnx"
        out = out.with_name(out.stem + ("" if row.compensate else "-nocomp") + ".onnx")
        cfg = RunConfig("dinov2_s", row.budget, out, effort=row.effort, data=train_dir if row.data else None, latency_runs=0,
                        compensate=row.compensate)
        shutil.rmtree(cfg.work_dir, ignore_errors=True)  # a row is timed from scratch, never resumed
        load = os.getloadavg()[0]
        start = time.perf_counter()
        report = run(cfg, console)
        wall = time.perf_counter() - start
        effort = resolve_effort(row.effort, device)
        result = {
            "row": row.name, "device": device, "effort": row.effort, "data": row.data, "budget": row.budget,
            "compensate": row.compensate, "compensation_s": (report.get("compensation") or {}).get("seconds"),
            "machine": _machine(),
            "wall_s": wall, "load_at_start": load, "load_at_end": os.getloadavg()[0],
            "search_steps": effort.search_steps, "finetune_steps": effort.finetune_steps,
            "images": effort.search_images, "batch": effort.batch_size,
            "mac_ratio": report["macs"]["onnx_ratio"], **knn_both(out),
            "fidelity": report["fidelity"], "stage_seconds": report["stage_seconds"],
        }
        results[:] = [r for r in results if not (r["row"] == row.name and r["device"] == device)] + [result]
        _save(stored)
        console.print(f"[bold]{row.name}[/] on {device}: k-NN {result['knn_top1']:.4f} / digits {result['knn_digits']:.4f}, {wall:.0f} s")
    return 0


def _load() -> dict[str, Any]:
    path = OUT / "effort.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        for r in stored["rows"]:  # rows from before compensation keep their figures under their own name
            if r["row"] != "dense" and "compensate" not in r:
                r.update(row=r["row"] + BEFORE_COMPENSATION, compensate=False)
        return stored
    return {"meta": {}, "rows": []}


def _save(stored: dict[str, Any]) -> None:
    stored["meta"] = {
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": f"dinov2_s (real DINOv2 ViT-S/14 weights) at {IMG_SIZE} px",
        "protocol": f"k-NN top-1 (cosine, k=20, T=0.07) of the written ONNX in ONNX Runtime CPU; bank {BANK_PER_CLASS}/class "
                    f"from Fashion-MNIST train, queries {TEST_PER_CLASS}/class from its test split; --data rows search and "
                    f"recover on {TRAIN_PER_CLASS}/class train images (a separate draw from the bank); digits: scikit-learn's "
                    f"8×8 handwritten digits, bank {DIGIT_BANK}/class, the next {DIGIT_QUERIES}/class as queries",
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
        f"- last run on: {meta.get('machine', {}).get('cpu_model')}, {meta.get('machine', {}).get('cpu_count')} CPUs; updated "
        f"{meta.get('updated')}; each row names its machine",
        "- wall: from the start of the run to the written file, export, parity and fidelity included (latency skipped); "
        "the load average at the start and end says whether the machine was shared; wall times compare only between rows "
        "of the same machine",
        "- fidelity (the run's report, on its own held-out images): feature cosine to dense, share of k-NN neighbours kept, "
        "relation agreement",
        "- reproduce: `python -m exporter.bench.effort` (rows already in effort.json for this device are kept)",
        "",
        "| row | device | machine | steps (search/recovery), images, batch | wall | load | MAC ratio | cosine | neighbours | "
        "relations | Fashion-MNIST k-NN | vs dense | digits k-NN | vs dense |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense = {r["device"]: r for r in results if r["row"] == "dense"}

    def knn(r: dict[str, Any], key: str) -> tuple[str, str]:
        if key not in r:
            return "", ""
        base = dense.get(r["device"], {}).get(key)
        return f"{100 * r[key]:.1f}%", ("" if base is None or r["row"] == "dense" else f"{100 * (r[key] - base):+.1f}")

    for r in results:
        fashion, digits = knn(r, "knn_top1"), knn(r, "knn_digits")
        if r["row"] == "dense":
            lines.append(f"| dense | {r['device']} | {r.get('machine', '')} | | | | 1.0000 | | | | {fashion[0]} | | {digits[0]} | |")
            continue
        f = r["fidelity"]
        lines.append(
            f"| {r['row']} | {r['device']} | {r.get('machine', '')} | {r['search_steps']}/{r['finetune_steps']}, {r['images']}, {r['batch']} | "
            f"{r['wall_s'] / 60:.1f} min | {r['load_at_start']:.1f}→{r['load_at_end']:.1f} | {r['mac_ratio']:.4f} | "
            f"{f['feature_cosine']:.4f} | {f['knn_agreement']:.3f} | {f['relation_agreement']:.4f} | "
            f"{fashion[0]} | {fashion[1]} | {digits[0]} | {digits[1]} |"
        )
    with atomic_path(OUT / "effort.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot(results, OUT / "effort.png")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Fidelity (feature cosine to dense, relation agreement) over wall minutes, one series per (device, data, budget, era)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[tuple[float, float, float, str]]] = {}
    for r in results:
        if r["row"] == "dense" or "fidelity" not in r:
            continue
        era = "" if r.get("compensate", False) else (" before compensation" if r["row"].endswith(BEFORE_COMPENSATION) else " no compensation")
        key = f"{r['device']}, {'--data' if r['data'] else 'built-in'} @ {r['budget']:g}{era}"
        f = r["fidelity"]
        series.setdefault(key, []).append((r["wall_s"] / 60, f["feature_cosine"], f["relation_agreement"], r["effort"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        for ax, column in zip(axes, (1, 2)):
            ax.plot([p[0] for p in pts], [p[column] for p in pts], marker="o", label=key)
            for p in pts:
                ax.annotate(p[3], (p[0], p[column]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ticks = [2, 3, 5, 10, 20, 30, 60]
    for ax, label in zip(axes, ("feature cosine to dense", "relation agreement to dense")):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("wall time of the run (minutes, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("dinov2_s at 224 px: fidelity bought by --effort")
    if series:
        axes[1].legend(fontsize="x-small")
    save_png(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
