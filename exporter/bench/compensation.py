"""Compensation bench: fidelity to dense of one plan, cut as it is and compensated in closed form, with no recovery.

One acp plan (searched once, or given with ``--plan``) of the bundled DINOv2-S on the built-in photographs
(no data, the user's headline command), cut, then compensated with each setting asked for; each
row is the held-out fidelity of the PyTorch model (feature cosine, k-NN neighbours kept, relation
agreement; 200 held-out crops the calibration never saw) and the seconds compensation took.

    python -m exporter.bench.compensation --img-size 112 --out artifacts/bench/compensation
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from exporter.compensation import CompensationConfig, compensate
from exporter.fidelity import fidelity
from exporter.held_out import torch_outputs
from exporter.machine import cpu_identity, describe_cpu
from exporter.options import DEFAULT_BUDGET
from exporter.pipeline import run
from exporter.stages.config import RunConfig, resolve_defaults
from exporter.stages.images import load_images
from exporter.surgery import apply_plan
from search.budget.plan import Plan
from search.core.runtime import runtime
from search.models.load import load_model

SETTINGS: dict[str, dict[str, Any] | None] = {
    "cut, no compensation": None,
    "compensation (defaults)": {},
    "no rearrangement": {"rearrange": False},
    "no fc1 refit": {"inputs": False},
    "no query fit": {"logits": False},
    "own-output targets": {"stream": False},
    "ridge 0.01": {"ridge": 0.01},
    "512 images": {"images": 512},
    "512 images, ridge 0.03": {"images": 512, "ridge": 0.03},
    "ridge 1": {"ridge": 1.0},
}


def _plan(args: argparse.Namespace, work: Path) -> Path:
    if args.plan:
        return Path(args.plan)
    out = work / "plan-run.onnx"
    run(RunConfig(model="dinov2_s", budget=args.budget, output=out, img_size=args.img_size, effort=args.effort,
                  finetune_steps=0, compensate=False, latency_runs=0, keep_work=True))
    return out.with_suffix(".work") / "plan.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    parser.add_argument("--effort", default="fast", help="the effort whose search and image counts the plan and calibration use")
    parser.add_argument("--plan", default=None, help="a plan.json to cut (default: search one with acp first)")
    parser.add_argument("--only", action="append", default=None, help="run only the settings named (repeatable)")
    parser.add_argument("--out", default="artifacts/bench/compensation")
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = Path(".cache/bench-compensation") / f"{args.img_size}px-{args.budget:g}"
    work.mkdir(parents=True, exist_ok=True)
    plan_path = _plan(args, work)
    loaded = load_model("dinov2_s", None, False, args.img_size, None)
    cfg = resolve_defaults(RunConfig(model="dinov2_s", budget=args.budget, output=work / "x.onnx", effort=args.effort), False)
    images = load_images(cfg, loaded)
    plan = Plan.load(plan_path)
    reference = torch_outputs(loaded.model, images.held_out.images)
    rows = []
    with runtime("cpu") as rt:
        for name, setting in SETTINGS.items():
            if args.only and name not in args.only:
                continue
            pruned = apply_plan(loaded.model, plan, loaded.geometry)
            seconds, config = 0.0, None
            if setting is not None:
                config = replace(CompensationConfig(images=min(CompensationConfig.images, len(images.pool))), **setting)
                started = time.perf_counter()
                compensate(loaded.model, pruned, plan, images.pool, config, rt)
                seconds = time.perf_counter() - started
            figures = fidelity(reference, torch_outputs(pruned, images.held_out.images), False)
            rows.append({"setting": name, "config": None if config is None else asdict(config), "seconds": round(seconds, 1),
                         **{k: figures[k] for k in ("feature_cosine", "knn_agreement", "relation_agreement")}})
            print(rows[-1], flush=True)
    report = {"img_size": args.img_size, "budget": args.budget, "plan": str(plan_path), "mac_ratio": plan.mac_ratio,
              "images": images.label, "held_out": len(images.held_out.images), "machine": describe_cpu(cpu_identity()), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# Compensation after the cut: dinov2_s at {args.img_size} px, budget {args.budget:g} (MAC ratio {plan.mac_ratio:.4f})", "",
             f"No recovery. Calibration: the search pool ({images.label}); fidelity on {len(images.held_out.images)} held-out crops, "
             f"PyTorch outputs. Machine: {report['machine']}.", "",
             "| setting | feature cosine | k-NN neighbours kept | relation agreement | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['feature_cosine']:.4f} | {r['knn_agreement']:.3f} | {r['relation_agreement']:.4f} | {r['seconds']:.0f} |"
              for r in rows]
    lines += ["", f"Reproduce: `python -m exporter.bench.compensation --img-size {args.img_size} --budget {args.budget:g} --effort {args.effort}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
