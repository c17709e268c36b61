"""Recovery over a long run: does the schedule hold up, and does the kept-state rule keep a good state?

Recovery keeps the state with the best held-out relation agreement (``exporter.recovery``), measured
on the run's own held-out images, which without --data are crops of the built-in photographs. A
long run could drift in ways those images do not show. This bench runs recovery far past the CPU
default on one acp plan and, at every held-out evaluation, also measures what a user would see:
k-NN top-1 on Fashion-MNIST (bank from the training split, queries from the test split). Each
schedule is one row of curves; the table says which step the rule kept and where k-NN peaked.

    python -m exporter.bench.recovery_curve [--steps 400] [--img-size 112] [--data]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from exporter.bench.figures import pyplot, save_png
from exporter.held_out import torch_outputs
from exporter.timing import machine_info
from exporter.pipeline import RunConfig, load_images, resolve_defaults
from exporter.recovery import RecoveryConfig, recover
from exporter.reweight import add_reweights, fold_reweights
from exporter.surgery import apply_plan
from search.budget.allocate import SolverConfig, make_plan
from search.methods.acp import AcpConfig, acp_search
from search.core.atomic import atomic_path
from search.core.runtime import Runtime
from search.images.folders import image_folder, stack_images
from search.images.fashion_mnist import write_image_folder
from exporter.knn import knn_top1
from search.models.load import load_model

OUT = Path("artifacts/bench")
SCHEDULES: dict[str, dict[str, float]] = {
    "lr 1e-4, 10% warm-up, cosine (the default)": {},
    "lr 3e-4, 10% warm-up, cosine": {"lr": 3e-4},
    "lr 3e-5, 10% warm-up, cosine": {"lr": 3e-5},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--data", action="store_true", help="search and recover on Fashion-MNIST train images instead of the built-in photographs")
    parser.add_argument("--only", action="append", default=None, help="schedules whose name contains this")
    args = parser.parse_args(argv)
    os.environ.setdefault("PRUNE_EXPORT_OFFLINE", "1")
    console = Console(stderr=True)
    torch.manual_seed(0)
    bench_started, load_start = time.perf_counter(), os.getloadavg()[0]
    root = Path(".cache/fashion-mnist")
    train = write_image_folder("train", root / "train300", 300, seed=0) if args.data else None
    bank_dir = write_image_folder("train", root / "bank100", 100, seed=1)
    test_dir = write_image_folder("test", root / "test100", 100, seed=0)
    loaded = load_model("dinov2_s", img_size=args.img_size)
    bank = stack_images(image_folder(bank_dir, loaded.data_config))
    test = stack_images(image_folder(test_dir, loaded.data_config))
    cfg = resolve_defaults(RunConfig("dinov2_s", 0.63, Path("/tmp/curve.onnx"), data=train, search_images=1024), False, "cpu")
    images = load_images(cfg, loaded)
    rt = Runtime(torch.device("cpu"))
    dense_knn = knn_top1(torch_outputs(loaded.model, bank[0]), bank[1], torch_outputs(loaded.model, test[0]), test[1])
    console.print(f"dense k-NN {dense_knn:.4f}")
    result = acp_search(loaded.model, loaded.geometry, images.pool, AcpConfig(budget=0.63, steps=cfg.search_steps), False, rt)
    plan = make_plan(loaded.geometry, result.scores, SolverConfig(0.63, 8), model="dinov2_s", img_size=args.img_size, method="acp")
    rows: list[dict[str, Any]] = []
    for name, overrides in SCHEDULES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        pruned = apply_plan(copy.deepcopy(loaded.model), plan, loaded.geometry)
        add_reweights(pruned)
        every = max(20, args.steps // 10)
        config = replace(RecoveryConfig(steps=args.steps, eval_every=every, checkpoint_every=every), **overrides)
        curve: list[tuple[int, float]] = []

        def on_step(done: int, model=pruned, config=config, curve=curve) -> None:
            if done % config.eval_every == 0 or done == config.steps:
                curve.append((done, knn_top1(torch_outputs(model, bank[0]), bank[1], torch_outputs(model, test[0]), test[1])))

        start_knn = knn_top1(torch_outputs(pruned, bank[0]), bank[1], torch_outputs(pruned, test[0]), test[1])
        started = time.perf_counter()
        out = recover(pruned, loaded.model, images.pool, images.held_out, config, False, rt, on_step=on_step)
        fold_reweights(pruned)
        kept_knn = knn_top1(torch_outputs(pruned, bank[0]), bank[1], torch_outputs(pruned, test[0]), test[1])
        curve = [(0, start_knn), *curve]
        best_step, best_knn = max(curve, key=lambda c: c[1])
        rows.append({"schedule": name, "config": asdict(config), "seconds": time.perf_counter() - started,
                     "relation_agreement": out.history, "knn": curve, "kept_step": out.best_step, "kept_knn": kept_knn,
                     "best_knn_step": best_step, "best_knn": best_knn})
        console.print(f"{name}: kept step {out.best_step} k-NN {kept_knn:.4f}; best k-NN {best_knn:.4f} at step {best_step}")
    payload = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "img_size": args.img_size,
               "steps": args.steps, "data": "Fashion-MNIST train (300/class)" if args.data else "built-in photographs",
               "images": cfg.search_images, "batch": cfg.batch_size, "dense_knn": dense_knn, "mac_ratio": plan.mac_ratio,
               "machine": machine_info(), "rows": rows, "only": args.only,
               "wall_s": time.perf_counter() - bench_started, "load": [load_start, os.getloadavg()[0]]}
    stem = f"recovery_curve_{'data' if args.data else 'builtin'}"
    OUT.mkdir(parents=True, exist_ok=True)
    with atomic_path(OUT / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(payload, OUT / f"{stem}.md")
    plot(payload, OUT / f"{stem}.png")
    return 0


def write_markdown(payload: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Recovery over a long run ({payload['data']})", "",
        f"- dinov2_s at {payload['img_size']} px, one acp plan at 0.63 (MAC ratio {payload['mac_ratio']:.4f}); "
        f"{payload['steps']} recovery steps, batch {payload['batch']}, {payload['images']} pool images",
        "- k-NN top-1 (cosine, k=20, T=0.07), PyTorch features: bank 100/class from Fashion-MNIST train, queries "
        f"100/class from its test split; dense {100 * payload['dense_knn']:.1f}%",
        f"- machine: {payload['machine'].get('cpu_model')}; created {payload['created']}",
        "- reproduce: `python -m exporter.bench.recovery_curve" + (" --data" if "Fashion" in payload["data"] else "")
        + f" --steps {payload['steps']} --img-size {payload['img_size']}"
        + "".join(f' --only "{o}"' for o in payload.get("only") or ()) + "`",
        f"- wall: {payload['wall_s'] / 60:.0f} min in all, load average {payload['load'][0]:.1f} at the start and "
        f"{payload['load'][1]:.1f} at the end (minutes per row below are as slow as the machine was shared)"
        if "wall_s" in payload else "- wall: not recorded" + (f"; {payload['note']}" if "note" in payload else ""), "",
        "| schedule | k-NN at step 0 | kept step (relation agreement) | k-NN of kept state | best k-NN (step) | last k-NN | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        lines.append(f"| {r['schedule']} | {100 * r['knn'][0][1]:.1f}% | {r['kept_step']} | {100 * r['kept_knn']:.1f}% | "
                     f"{100 * r['best_knn']:.1f}% ({r['best_knn_step']}) | {100 * r['knn'][-1][1]:.1f}% | {r['seconds'] / 60:.1f} |")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in payload["rows"]:
        steps, knn = zip(*r["knn"])
        a.plot(steps, [100 * k for k in knn], marker="o", label=r["schedule"])
        steps, ra = zip(*r["relation_agreement"])
        b.plot(steps, ra, marker="o", label=r["schedule"])
    a.axhline(100 * payload["dense_knn"], color="grey", linewidth=0.8, label="dense")
    a.set_xlabel("recovery step"), a.set_ylabel("k-NN top-1 on Fashion-MNIST test (%)")
    b.set_xlabel("recovery step"), b.set_ylabel("held-out relation agreement")
    a.legend(fontsize="x-small"), a.grid(alpha=0.3), b.grid(alpha=0.3)
    fig.suptitle(f"dinov2_s @ 0.63, recovery on {payload['data']}", fontsize=10)
    save_png(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
