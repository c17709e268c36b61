"""Ablation bench: does each part of acp earn its place, beyond the seed-to-seed spread?

Model: dinov2_s (real DINOv2 ViT-S/14 weights). Data: Fashion-MNIST from the Debian package. Every row
runs the pipeline (``exporter.pipeline.run``) with the CLI's default search and recovery steps, and
is measured twice: the exported ONNX file before recovery and after it. Metric: k-NN top-1 (DINO
protocol) on the whole Fashion-MNIST test split (10,000 images, so one row's binomial noise is at
most ±0.5 points), against a bank of 2,000 training images, features from ONNX Runtime.

Rows, for seeds 0, 1, 2 (the seed draws the 456 search and held-out images, the batches, and random
scores):
- ``acp`` with its defaults, and the baselines ``magnitude``, ``random`` and Torch-Pruning at matched
  MACs, recovered alike, at budgets 0.63 and 0.5;
- at 0.63, one acp row per part of the method with that part switched: the other indicator form,
  the other width source, the other gate optimiser, no similarity weights, no attention-difference
  init, no reweights (a recovery part: its before-recovery figure is acp's);
- ``dense`` and the dense model through the same recovery from a perturbed start (weights ×
  (1 + 0.2·noise)), which asks whether recovery alone lifts k-NN above the dense model: both the
  state recovery keeps (best held-out agreement with the teacher) and its final state.

What was cut to stay near 2 hours on a 2-core CPU: 56 px inputs (4×4 patches; the dense model scores
within a point of its 112 px figure here), 256 search images, a 2,000-image bank. Results are kept
per row in ``.cache/ablation/rows.json``, so a stopped run resumes where it stopped.

    python -m exporter.bench.ablation [--budgets 0.63] [--seeds 0,1,2] [--only NAME] [--render]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console

from exporter.bench.ablation_plot import plot
from exporter.bench.quality import knn_of, matches_row, torch_pruning_row
from exporter.timing import machine_info
from exporter.onnx_export import export_onnx
from exporter.pipeline import RunConfig, load_images, run
from exporter.recovery import RecoveryConfig, recover
from search.methods.acp import INDICATORS, OPTIMISERS, WIDTHS, AcpConfig
from search.core.atomic import atomic_path
from search.core.progress import progress_bar
from search.core.runtime import Runtime
from search.images.folders import image_folder, stack_images
from search.images.fashion_mnist import write_image_folder
from search.models.load import load_model
from exporter.machine import describe_cpu

OUT = Path("artifacts/bench")
CACHE = Path(".cache/ablation")
MODEL = "dinov2_s"
DENSE_KEPT = "dense, perturbed, same recovery"
DENSE_FINAL = "dense, perturbed, same recovery, final state"


@dataclass(frozen=True)
class BenchConfig:
    """Settings shared by every row (see the module docstring for why these)."""

    img_size: int = 56
    search_steps: int = AcpConfig.steps
    finetune_steps: int = RecoveryConfig.steps
    train_per_class: int = 100
    bank_per_class: int = 200
    test_per_class: int = 1000
    perturb: float = 0.2


SWITCH_BUDGETS = (0.63,)
"""Where the acp rows with one part switched run: the budget the CLI defaults to (time allows one)."""


@dataclass(frozen=True)
class Variant:
    """One row: a method, the RunConfig fields that differ from the defaults, and the budgets it runs at."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    recovery_only: bool = False
    budgets: tuple[float, ...] = (0.63, 0.5)


def _other(choices: Sequence[str], default: str) -> str:
    return next(c for c in choices if c != default)


def variants() -> list[Variant]:
    """acp with its defaults, acp with one part switched per row, then the baselines."""
    d = AcpConfig(budget=1.0)
    indicator, widths, optimiser = _other(INDICATORS, d.indicator), _other(WIDTHS, d.widths), _other(OPTIMISERS, d.optimiser)
    switch = dict(budgets=SWITCH_BUDGETS)
    return [
        Variant("acp", "acp"),
        Variant(f"acp, {indicator} indicator", "acp", {"indicator": indicator}, **switch),
        Variant(f"acp, {widths} widths", "acp", {"widths": widths}, **switch),
        Variant(f"acp, {optimiser} gate optimiser", "acp", {"gate_optimiser": optimiser}, **switch),
        Variant("acp, no similarity", "acp", {"similarity": False}, **switch),
        Variant("acp, no attention init", "acp", {"attn_init": False}, **switch),
        Variant("acp, no reweight", "acp", {"reweight": False}, recovery_only=True, **switch),
        Variant("magnitude", "magnitude"),
        Variant("random", "random"),
        Variant("Torch-Pruning", "torch-pruning"),
    ]


def _slug(*parts: object) -> str:
    return "_".join("".join(c if c.isalnum() else "-" for c in str(p)) for p in parts)


class Bench:
    """The shared images and the per-row result store."""

    def __init__(self, cfg: BenchConfig, console: Console) -> None:
        self.cfg, self.console = cfg, console
        root = Path(".cache/fashion-mnist")
        self.train_dir = write_image_folder("train", root / f"train{cfg.train_per_class}", cfg.train_per_class, seed=0)
        test_dir = write_image_folder("test", root / f"test{cfg.test_per_class}", cfg.test_per_class, seed=0)
        bank_dir = write_image_folder("train", root / f"bank{cfg.bank_per_class}", cfg.bank_per_class, seed=1)
        data_config = load_model(MODEL, img_size=cfg.img_size).data_config
        self.bank = stack_images(image_folder(bank_dir, data_config))
        self.test = stack_images(image_folder(test_dir, data_config))
        self.threads = len(os.sched_getaffinity(0))
        CACHE.mkdir(parents=True, exist_ok=True)
        self.store = CACHE / "rows.json"
        self.rows: dict[str, dict[str, Any]] = json.loads(self.store.read_text()) if self.store.is_file() else {}

    def key(self, name: str, budget: float, seed: int) -> str:
        return json.dumps([name, budget, seed, asdict(self.cfg)])

    def save(self, key: str, row: dict[str, Any]) -> None:
        self.rows[key] = row
        with atomic_path(self.store) as tmp:
            tmp.write_text(json.dumps(self.rows, indent=1) + "\n")

    def knn(self, path: Path) -> float:
        return knn_of(path, self.bank, self.test, self.threads)

    def base(self, budget: float, seed: int, out: Path) -> RunConfig:
        return RunConfig(MODEL, budget, out, data=self.train_dir, img_size=self.cfg.img_size, search_steps=self.cfg.search_steps,
                         latency_runs=0, seed=seed)

    def pipeline_row(self, v: Variant, budget: float, seed: int) -> dict[str, Any]:
        """Run the pipeline without and then with recovery (the second run reuses the searched plan)."""
        out = CACHE / f"{_slug(v.name, budget, seed)}.onnx"
        cfg = replace(self.base(budget, seed, out), method=v.method, **v.overrides)
        before = None
        if not v.recovery_only:
            report = run(replace(cfg, finetune_steps=0), self.console)
            before = self.knn(out)
        report = run(replace(cfg, finetune_steps=self.cfg.finetune_steps), self.console)
        rec = report["recovery"] or {}
        return {"before": before, "after": self.knn(out), "mac_ratio": report["macs"]["onnx_ratio"],
                "agreement_start": rec.get("history", [[0, None]])[0][1], "agreement_best": rec.get("best_value")}

    def tp_row(self, budget: float, seed: int) -> dict[str, Any]:
        from exporter.bench.quality import BenchConfig as QualityConfig

        out = CACHE / f"tp_{_slug(budget, seed)}"
        out.mkdir(exist_ok=True)
        q = QualityConfig(img_size=self.cfg.img_size, train_per_class=self.cfg.train_per_class, seed=seed)
        path, extra = torch_pruning_row(replace(q, finetune_steps=0), self.train_dir, budget, out)
        before = self.knn(path)
        path, extra = torch_pruning_row(replace(q, finetune_steps=self.cfg.finetune_steps), self.train_dir, budget, out)
        return {"before": before, "after": self.knn(path), "mac_ratio": extra["mac_ratio"],
                "agreement_start": extra.get("relation_agreement_start"), "agreement_best": extra.get("relation_agreement_best")}

    def dense_rows(self, seed: int) -> dict[str, dict[str, Any]]:
        """The dense model, and the dense model through the same recovery from a perturbed start.

        Recovery keeps the state whose held-out relation agreement with the teacher is best; the
        final state is measured as well, since a gain that comes with drifting from the teacher's
        geometry is exactly what that rule would hide.
        """
        out = CACHE / f"dense_{seed}.onnx"
        cfg = self.base(1.0, seed, out)
        loaded = load_model(MODEL, img_size=self.cfg.img_size)
        size = tuple(loaded.data_config["input_size"])
        dense_acc = self.knn(export_onnx(loaded.model, out, size))
        student = copy.deepcopy(loaded.model)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in student.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.mul_(1 + self.cfg.perturb * torch.randn(module.weight.shape, generator=gen))
        perturbed = self.knn(export_onnx(student, out, size))
        images = load_images(replace(cfg, finetune_steps=self.cfg.finetune_steps), loaded)
        final: dict[str, torch.Tensor] = {}

        def keep_final(step: int) -> None:
            if step == self.cfg.finetune_steps:
                final.update({k: v.detach().clone() for k, v in student.state_dict().items()})

        result = recover(student, loaded.model, images.pool, images.held_out, RecoveryConfig(steps=self.cfg.finetune_steps, seed=seed),
                         classifier=False, runtime=Runtime(torch.device("cpu")), on_step=keep_final)
        kept = self.knn(export_onnx(student.eval(), out, size))
        student.load_state_dict(final)
        last = self.knn(export_onnx(student.eval(), out, size))
        common = {"before": perturbed, "mac_ratio": 1.0, "agreement_start": result.history[0][1]}
        return {
            "dense": {"before": dense_acc, "after": dense_acc, "mac_ratio": 1.0},
            DENSE_KEPT: {**common, "after": kept, "agreement_best": result.best_value, "kept_step": result.best_step},
            DENSE_FINAL: {**common, "after": last, "agreement_final": result.history[-1][1]},
        }


def run_bench(cfg: BenchConfig, budgets: Sequence[float], seeds: Sequence[int], only: Sequence[str] | None, console: Console) -> Bench:
    bench = Bench(cfg, console)
    chosen = [v for v in variants() if not only or any(matches_row(o, v.name) for o in only)]
    todo = [(v, b, s) for b in budgets for s in seeds for v in chosen if b in v.budgets and bench.key(v.name, b, s) not in bench.rows]
    dense_todo = [s for s in seeds if bench.key(DENSE_FINAL, 1.0, s) not in bench.rows] if not only or "dense" in only else []
    with progress_bar("ablation bench", total=len(todo) + len(dense_todo)) as advance:
        for s in dense_todo:
            for name, row in bench.dense_rows(s).items():
                bench.save(bench.key(name, 1.0, s), {"name": name, "budget": 1.0, "seed": s, **row})
            advance(f"dense, seed {s}")
        for v, b, s in todo:
            row = bench.tp_row(b, s) if v.method == "torch-pruning" else bench.pipeline_row(v, b, s)
            if v.recovery_only:
                acp = bench.rows.get(bench.key("acp", b, s))
                row["before"] = None if acp is None else acp["before"]
            bench.save(bench.key(v.name, b, s), {"name": v.name, "budget": b, "seed": s, **row})
            console.print(f"[bold]{v.name} @ {b:g}, seed {s}[/]: before {row['before']}, after {row['after']:.4f}")
            advance(f"{v.name} @ {b:g}, seed {s}")
    return bench


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± s.d. over seeds per (row, budget), and the paired difference to acp at the same budget and seed."""
    by: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["name"], r["budget"]), {})[r["seed"]] = r
    out = []
    for (name, budget), seeds in by.items():
        entry: dict[str, Any] = {"name": name, "budget": budget, "seeds": sorted(seeds), "mac_ratio": statistics.fmean(r["mac_ratio"] for r in seeds.values())}
        acp = by.get(("acp", budget), {})
        dense = by.get(("dense", 1.0), {})
        retrained = by.get((DENSE_FINAL, 1.0), {})
        for phase in ("before", "after"):
            vals = [r[phase] for r in seeds.values() if r.get(phase) is not None]
            if vals:
                entry[phase] = _stats(vals)
            diffs = [r[phase] - acp[s][phase] for s, r in seeds.items() if s in acp and r.get(phase) is not None and acp[s].get(phase) is not None]
            if diffs and name != "acp" and budget != 1.0:
                entry[f"{phase}_vs_acp"] = _stats(diffs)
            ref = [r[phase] - dense[s]["after"] for s, r in seeds.items() if s in dense and r.get(phase) is not None]
            if ref and name != "dense":
                entry[f"{phase}_vs_dense"] = _stats(ref)
            ref = [r[phase] - retrained[s]["after"] for s, r in seeds.items() if s in retrained and r.get(phase) is not None]
            if ref and budget != 1.0:
                entry[f"{phase}_vs_retrained"] = _stats(ref)
        out.append(entry)
    order = {v.name: i for i, v in enumerate(variants())} | {"dense": -3, DENSE_KEPT: -2, DENSE_FINAL: -1}
    return sorted(out, key=lambda e: (e["budget"] != 1.0, -e["budget"], order.get(e["name"], 99)))


def _pm(stat: tuple[float, float] | None, scale: float = 100.0, sign: bool = False) -> str:
    if stat is None:
        return ""
    mean, sd = stat
    fmt = "+.1f" if sign else ".1f"
    return f"{scale * mean:{fmt}} ± {scale * sd:.1f}"


def verdict(entry: dict[str, Any], phase: str) -> str:
    """Whether switching a part changes k-NN (paired difference to acp) by more than the seed-to-seed spread."""
    d = entry.get(f"{phase}_vs_acp")
    if d is None:
        return ""
    mean, sd = d
    if len(entry["seeds"]) < 2:
        return "one seed: no spread"
    spread = max(sd, entry[phase][1])
    if abs(mean) <= spread:
        return "within spread"
    return "acp better" if mean < 0 else "switch better"


def markdown(summary: list[dict[str, Any]], cfg: BenchConfig, meta: dict[str, Any]) -> str:
    lines = [
        "# Ablation bench: each part of acp, dinov2_s on Fashion-MNIST",
        "",
        f"- k-NN top-1 (cosine, k=20, T=0.07) of the exported ONNX in ONNX Runtime; {cfg.img_size} px; the whole test split "
        f"({10 * cfg.test_per_class} images: one row's binomial noise is at most ±0.5 points); bank {10 * cfg.bank_per_class} training images",
        f"- search {cfg.search_steps} steps, recovery {cfg.finetune_steps} steps (the CLI's defaults); 256 search + 200 held-out "
        "training images drawn by the seed; seeds " + ", ".join(map(str, meta["seeds"])),
        "- every figure is mean ± s.d. over seeds; `vs acp` is the paired difference (same seed, same images) to the acp row at "
        "that budget; a part earns its place when switching it off costs more than the spread",
        f"- `vs dense through recovery`: against the dense model put through the same recovery (weights perturbed by "
        f"×(1 + {cfg.perturb:g}·noise) so distillation has something to do, final state): recovery itself, not pruning, is what "
        "lifts every recovered row above the plain dense model, so this is the comparison that says what pruning costs",
        f"- acp defaults: {meta['defaults']}",
        f"- cut to fit about 2 hours on 2 CPU cores: {cfg.img_size} px inputs instead of 224, a {10 * cfg.bank_per_class}-image bank, "
        f"the switched-part rows at {', '.join(map(str, SWITCH_BUDGETS))} only",
        f"- machine: {describe_cpu(meta['machine'])}; created {meta['created']}",
        "- reproduce: `python -m exporter.bench.ablation`",
        "",
        "| row | budget | seeds | MAC ratio | before recovery | vs acp | verdict | after recovery | vs acp | verdict | after, vs dense | after, vs dense through recovery |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for e in summary:
        lines.append(
            f"| {e['name']} | {e['budget']:g} | {len(e['seeds'])} | {e['mac_ratio']:.3f} | {_pm(e.get('before'))} | {_pm(e.get('before_vs_acp'), sign=True)} | "
            f"{verdict(e, 'before')} | "
            f"{_pm(e.get('after'))} | {_pm(e.get('after_vs_acp'), sign=True)} | {verdict(e, 'after')} | {_pm(e.get('after_vs_dense'), sign=True)} | "
            f"{_pm(e.get('after_vs_retrained'), sign=True)} |"
        )
    return "\n".join(lines) + "\n"


def write(bench_rows: list[dict[str, Any]], cfg: BenchConfig, seeds: Sequence[int], out: Path,
          meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """ablation.{json,md,png} from the rows; ``meta`` (when re-rendering) keeps the original run's machine and date."""
    summary = summarise(bench_rows)
    d = AcpConfig(budget=1.0)
    meta = meta or {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": asdict(cfg), "seeds": list(seeds),
            "defaults": f"indicator {d.indicator}, widths {d.widths}, gate optimiser {d.optimiser}, similarity on, attention init on, reweights on",
            "machine": machine_info()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "ablation.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, "summary": summary, "rows": bench_rows}, indent=1) + "\n")
    with atomic_path(out / "ablation.md") as tmp:
        tmp.write_text(markdown(summary, cfg, meta))
    plot(summary, out / "ablation.png", DENSE_FINAL)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="0.63,0.5", help="comma-separated budgets")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--only", action="append", default=None, help="run only rows whose name contains this, or is exactly it after a leading '=' (repeatable)")
    parser.add_argument("--img-size", type=int, default=BenchConfig.img_size)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render", action="store_true", help="rewrite the report from the stored rows, running nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("PRUNE_EXPORT_OFFLINE", "1")
    cfg = BenchConfig(img_size=args.img_size)
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    console = Console(stderr=True)
    if args.render:  # the committed report's own rows and meta: a re-render changes nothing the inputs did not
        committed = json.loads((args.out / "ablation.json").read_text())
        write(committed["rows"], BenchConfig(**committed["meta"]["config"]), committed["meta"]["seeds"], args.out, committed["meta"])
        console.print(f"re-rendered {args.out}/ablation.md, .png from ablation.json")
        return 0
    stored = run_bench(cfg, budgets, seeds, args.only, console).rows
    rows = [r for key, r in stored.items() if json.loads(key)[3] == asdict(cfg)
            and r["seed"] in seeds and (r["budget"] in budgets or r["budget"] == 1.0)]
    write(rows, cfg, seeds, args.out)
    console.print(f"wrote {args.out}/ablation.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
