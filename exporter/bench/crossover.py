"""Where focused linear attention starts to beat softmax attention in latency, dense and pruned.

Softmax attention costs H·N²·(d_qk + d_v) MACs per block for its token mixing, focused linear
attention (FLatten) H·N·(2·d_qk·d_v + d_qk) plus its depthwise conv: linear in the token count N,
but with elementwise work (the focusing map's powers and norms) that MACs do not see. This bench
measures where the two cross on a real runtime rather than assuming it from the MAC count.

At each image size (224, 448 and 672 px, and 288 to 384 px and 560 px between them, so that the
crossover is measured rather than interpolated) it builds DeiT-S geometry twice on random
weights (latency does not depend on the values; biases and norm parameters are jittered, as in
:mod:`exporter.bench.latency`, so onnxsim keeps a realistic graph):

- ``softmax``: ``deit_small_patch16_224`` built with ``img_size=px``;
- ``linear``: ``flatten_deit_s`` with pattern "L"·12 (every block focused linear attention);

each dense and pruned to 0.63 of its own dense MACs by the project's own planner (magnitude
scores, ``--align 8``) and surgery, exported with :func:`exporter.onnx_export.export_onnx`. Every
file is checked against its PyTorch model in ONNX Runtime before it is timed; a file that fails
parity is reported and not timed. The four files of one size are timed in ONE interleaved run
(batch 1, 2 intra-op threads, spinning off; medians), so their ratios share the machine's drift;
that run is repeated in three passes, each in a fresh process, because the linear graph's latency
moved between runs by more than within one (:func:`measure_size`). MACs are given twice: analytic (:mod:`search.budget.macs`) and counted from the graph
(:mod:`exporter.onnx_macs`).

Outputs: crossover.md, .json and .png under ``artifacts/bench``.

    python -m exporter.bench.crossover [--quick] [--out artifacts/bench] [--work .cache/bench/crossover] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

import search.models.flatten.deit  # noqa: F401  (registers flatten_deit_s with timm)
from exporter.bench.jitter import jitter
from exporter.bench.crossover_report import markdown, plot
from exporter.timing import LatencyResult, machine_info, measure_latency
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs
from exporter.surgery import apply_plan
from exporter.parity import check_parity
from search.budget.allocate import SolverConfig, make_plan
from search.attention import TokenLayout, get_kind
from search.core.atomic import atomic_path
from search.core.errors import ParityError
from search.methods.importance import magnitude_scores
from search.budget.macs import ModelGeometry, describe, model_macs, parameter_count

DEFAULT_OUT = Path("artifacts/bench")
DEFAULT_WORK = Path(".cache/bench/crossover")
SOFTMAX_MODEL = "deit_small_patch16_224"
LINEAR_MODEL = "flatten_deit_s"
LINEAR_PATTERN = "L" * 12
REFERENCE = "softmax dense"
ATTENTIONS = ("softmax", "linear")
NEAR_TIE = 0.05  # a latency ratio this close to 1 is called a near-tie in the findings


@dataclass(frozen=True)
class CrossoverConfig:
    """What one crossover run covers and how long it times.

    Attributes:
        sizes: image sizes in px (square), multiples of the patch size 16.
        runs: interleaved rounds per pass, one entry per size (large sizes take longer per round).
        warmup: untimed runs per model and pass, one entry per size.
        passes: independent timing passes per size, each in a fresh process (see :func:`measure_size`).
        budget: the pruned models' MAC budget, a fraction of their own dense MACs.
        align: kept widths are multiples of this (the CLI's default).
        threads: intra-op threads of every session.
        parity_images: random images each file is checked on against PyTorch.
        seed: weights, jitter, plans and inputs.
    """

    sizes: tuple[int, ...] = (224, 288, 320, 352, 384, 448, 560, 672)
    runs: tuple[int, ...] = (40, 30, 30, 30, 30, 20, 15, 12)
    warmup: tuple[int, ...] = (5, 5, 3, 3, 3, 3, 2, 2)
    passes: int = 3
    budget: float = 0.63
    align: int = 8
    threads: int = 2
    parity_images: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or len(self.runs) != len(self.sizes) or len(self.warmup) != len(self.sizes):
            raise ValueError(f"need one runs and one warmup entry per size; got sizes {self.sizes}, "
                             f"runs {self.runs}, warmup {self.warmup}")
        if any(s % 16 for s in self.sizes) or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes must be increasing multiples of the patch size 16, got {self.sizes}")
        if min(self.runs) < 1 or min(self.warmup) < 0 or min(self.threads, self.parity_images, self.passes) < 1:
            raise ValueError("runs, passes, threads and parity_images must be at least 1, warmup at least 0")


QUICK = CrossoverConfig(sizes=(64, 96), runs=(2, 2), warmup=(1, 1), passes=2)
"""Two tiny sizes and two rounds: checks the whole path (for tests), measures nothing useful."""


def build(attention: str, px: int, seed: int) -> nn.Module:
    """DeiT-S geometry at ``px`` with softmax or all-linear attention, random weights, jittered, eval mode."""
    torch.manual_seed(seed)
    if attention == "softmax":
        model = timm.create_model(SOFTMAX_MODEL, pretrained=False, img_size=px)
    elif attention == "linear":
        model = timm.create_model(LINEAR_MODEL, pretrained=False, img_size=px, pattern=LINEAR_PATTERN)
    else:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    return jitter(model, seed).eval()


def _parity(path: Path, model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    try:
        return asdict(check_parity(path, model, images, classifier=True))
    except ParityError as err:
        return {"passed": False, "error": str(err)}


def _paired(passes: Sequence[LatencyResult], name: str) -> dict[str, float]:
    """Median and quartiles of the per-round ratio to the reference (same round, adjacent runs), all passes pooled."""
    ratios = [a / b for result in passes for a, b in zip(result.samples_ms[name], result.samples_ms[REFERENCE])]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def time_in_fresh_process(paths: dict[str, Path], **settings: Any) -> LatencyResult:
    """:func:`exporter.timing.measure_latency` on ``paths``, run in a new (spawned) Python process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_latency, paths, **settings).result()


def measure_size(px: int, runs: int, warmup: int, cfg: CrossoverConfig, work: Path,
                 step: Callable[[str], None] = lambda _text: None) -> dict[str, Any]:
    """Build, export, check and time the four models at ``px``; returns the size's rows.

    The files are timed in ``cfg.passes`` independent passes, each one interleaved run in a fresh
    process. On this 2-core VM the all-linear model's latency at large sizes moved between runs by
    far more than the quartiles within a run (221 to 273 ms at 672 px over five runs, softmax 374
    to 396 ms), so one run can put the crossover a size early or late. A row's ``ms`` is the median
    over passes of each pass's median, and ``pass_ratios`` shows the spread between passes.
    ``step(text)`` is called before each stage (for a progress display).
    """
    work.mkdir(parents=True, exist_ok=True)
    images = torch.randn(cfg.parity_images, 3, px, px, generator=torch.Generator().manual_seed(cfg.seed + 1))
    rows: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    reference_macs = tokens = None
    for attention in ATTENTIONS:
        step(f"{px} px: {attention}: building and planning")
        dense = build(attention, px, cfg.seed)
        geometry = describe(dense)
        tokens = geometry.tokens
        plan = make_plan(geometry, magnitude_scores(dense), SolverConfig(cfg.budget, align=cfg.align),
                         model=attention, img_size=px, method="magnitude")
        pruned = apply_plan(dense, plan, geometry)
        for budget, model in ((1.0, dense), (cfg.budget, pruned)):
            name = f"{attention} {'dense' if budget == 1.0 else f'{budget:g}'}"
            step(f"{px} px: {name}: export")
            path = export_onnx(model, work / f"{name.replace(' ', '-')}-{px}.onnx", (3, px, px))
            step(f"{px} px: {name}: parity and MACs")
            analytic = model_macs(describe(model))
            reference_macs = reference_macs or analytic
            rows[name] = {
                "model": name, "attention": attention, "budget": budget, "px": px,
                "timm_name": SOFTMAX_MODEL if attention == "softmax" else f"{LINEAR_MODEL} pattern={LINEAR_PATTERN}",
                "analytic_macs": analytic, "onnx_macs": count_onnx_macs(path), "params": parameter_count(model),
                "mac_ratio_to_reference": analytic / reference_macs,
                "mac_ratio_to_own_dense": plan.mac_ratio if budget != 1.0 else 1.0,
                "parity": _parity(path, model, images), "path": str(path),
            }
            if rows[name]["parity"]["passed"]:
                paths[name] = path
        del dense, pruned
    timed: dict[str, Any] = {}
    if REFERENCE in paths:
        passes = []
        for i in range(cfg.passes):
            step(f"{px} px: timing {len(paths)} files, pass {i + 1}/{cfg.passes} of {runs} interleaved rounds")
            passes.append(time_in_fresh_process(paths, batch=1, threads=cfg.threads, runs=runs, warmup=warmup,
                                                input_size=(3, px, px), seed=cfg.seed, progress=False))
        timed = {"provider": passes[0].provider, "settings": passes[0].settings, "machine": passes[0].machine}
        reference_ms = statistics.median(r.median_ms[REFERENCE] for r in passes)
        for name in paths:
            ms = statistics.median(r.median_ms[name] for r in passes)
            rows[name].update(ms=ms, ratio=ms / reference_ms, paired=_paired(passes, name),
                              pass_ms=[r.median_ms[name] for r in passes],
                              pass_ratios=[r.ratio(name, REFERENCE) for r in passes],
                              samples_ms=[list(r.samples_ms[name]) for r in passes])
    for name, row in rows.items():
        if "ms" not in row:
            row.update(ms=None, ratio=None, paired=None, pass_ms=[], pass_ratios=[], samples_ms=[])
    return {"px": px, "tokens": tokens, "runs": runs, "warmup": warmup, "passes": cfg.passes,
            "rows": list(rows.values()), **timed}


def mac_crossover(softmax: ModelGeometry, linear: ModelGeometry, limit_px: int = 2048) -> int | None:
    """The smallest image size (a multiple of 16) at which the linear model's dense MACs are below softmax's.

    Counted with each block's kind at the token layout of every size, so it is the MAC count's
    prediction of the crossover, to set against the measured one. None when not reached by ``limit_px``.
    """
    def total(geometry: ModelGeometry, grid: int) -> int:
        layout = TokenLayout(prefix=geometry.layout.prefix, grid=(grid, grid))
        attention = sum(get_kind(b.kind).macs(b.attention, b.attention.num_heads, b.attention.qk_dim, b.attention.v_dim, layout)
                        for b in geometry.blocks)
        return attention  # the MLPs, patch embedding and head are the same in both models

    for px in range(16, limit_px + 1, 16):
        if total(linear, px // 16) < total(softmax, px // 16):
            return px
    return None


def crossover(sizes: Sequence[dict[str, Any]], linear: str, softmax: str) -> dict[str, Any]:
    """Where ``linear`` (a model name) starts to be faster than ``softmax``, from the measured medians.

    ``from_px`` is the smallest measured size from which linear is faster (median over passes) at
    every larger measured size too; ``passes_disagree_px`` lists the sizes where one pass had linear
    faster and another slower; ``estimate_px`` interpolates log(latency ratio) linearly in px between the last size it
    lost and the first it won (None when it wins everywhere or nowhere).
    """
    points, split = [], []
    for size in sizes:
        rows = {r["model"]: r for r in size["rows"]}
        if rows.get(linear, {}).get("ms") and rows.get(softmax, {}).get("ms"):
            points.append((size["px"], rows[linear]["ms"] / rows[softmax]["ms"]))
            per_pass = [a / b for a, b in zip(rows[linear].get("pass_ms", []), rows[softmax].get("pass_ms", []))]
            if per_pass and min(per_pass) < 1.0 < max(per_pass):
                split.append(size["px"])
    result: dict[str, Any] = {"linear": linear, "softmax": softmax, "ratios": {str(px): r for px, r in points},
                              "passes_disagree_px": split, "from_px": None, "estimate_px": None}
    if not points:
        return result
    winning = [r < 1.0 for _, r in points]
    for i in range(len(points)):
        if all(winning[i:]):
            result["from_px"] = points[i][0]
            if i > 0:
                (p0, r0), (p1, r1) = points[i - 1], points[i]
                result["estimate_px"] = round(p0 + (p1 - p0) * math.log(r0) / (math.log(r0) - math.log(r1)))
            break
    return result


def _sentence(c: dict[str, Any], sizes: Sequence[int], what: str) -> str:
    ratios = ", ".join(f"{px} px ×{r:.2f}" for px, r in c["ratios"].items())
    if not c["ratios"]:
        return f"{what}: not measured (a file failed parity)."
    if c["from_px"] is None:
        return f"{what}: linear attention does not win at any measured size up to {sizes[-1]} px (linear / softmax latency: {ratios})."
    smallest = min(map(int, c["ratios"]))
    if c["from_px"] == smallest:
        return f"{what}: linear attention is already faster at the smallest measured size, {smallest} px (linear / softmax latency: {ratios})."
    before = max(p for p in map(int, c["ratios"]) if p < c["from_px"])
    estimate = f", about {c['estimate_px']} px by interpolating the log ratio" if c["estimate_px"] else ""
    close = [px for px, r in c["ratios"].items() if abs(r - 1.0) <= NEAR_TIE]
    tie = (f" Within {NEAR_TIE:.0%} of a tie at {', '.join(f'{px} px' for px in close)}: there the two run at"
           " about the same speed and the order can change from run to run." if close else "")
    disagree = c.get("passes_disagree_px") or []
    split = (f" The timing passes disagreed on which is faster at {', '.join(f'{px} px' for px in disagree)}." if disagree else "")
    return (f"{what}: linear attention is faster from {c['from_px']} px on, and slower at {before} px: the crossover "
            f"lies between them{estimate} (linear / softmax latency: {ratios}).{tie}{split}")


def summarise(report: dict[str, Any]) -> None:
    """Add the crossover figures and sentences to ``report``, in place."""
    budget = f"{report['config']['budget']:g}"
    px = [s["px"] for s in report["sizes"]]
    report["crossover"] = {
        "dense": crossover(report["sizes"], "linear dense", "softmax dense"),
        "pruned": crossover(report["sizes"], f"linear {budget}", f"softmax {budget}"),
        "linear_pruned_vs_softmax_dense": crossover(report["sizes"], f"linear {budget}", "softmax dense"),
    }
    mac_px = report.get("mac_crossover_px")
    report["findings"] = [
        _sentence(report["crossover"]["dense"], px, "Dense"),
        _sentence(report["crossover"]["pruned"], px, f"Both pruned to {budget} of their MACs"),
        _sentence(report["crossover"]["linear_pruned_vs_softmax_dense"], px, f"Linear at {budget} against dense softmax"),
        (f"By MACs alone (dense attention MACs counted by each kind at every size), linear attention would win from "
         f"{mac_px} px on." if mac_px else "By MACs alone linear attention does not win below 2048 px."),
    ]


def run(cfg: CrossoverConfig, out: Path, work: Path, command: str, console: Console, keep: bool = False) -> dict[str, Any]:
    """Build, check and time everything in ``cfg``; write crossover.{md,json,png} under ``out``.

    Without ``keep`` each size's ONNX files are deleted once it is timed.
    """
    start = time.perf_counter()
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command, "config": asdict(cfg),
        "machine": machine_info(), "load_average_at_start": list(os.getloadavg()), "weights": "random weights; biases, norm parameters, FLatten's scale and positional encoding jittered",
        "models": {"softmax": SOFTMAX_MODEL, "linear": f"{LINEAR_MODEL}, pattern {LINEAR_PATTERN}"}, "sizes": [],
    }
    report["mac_crossover_px"] = mac_crossover(describe(build("softmax", 224, cfg.seed)),
                                               describe(build("linear", 224, cfg.seed)))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    with progress:
        task = progress.add_task("crossover", total=len(cfg.sizes))
        for px, runs, warmup in zip(cfg.sizes, cfg.runs, cfg.warmup):
            size_work = work / f"{px}"
            entry = measure_size(px, runs, warmup, cfg, size_work,
                                 step=lambda text: progress.update(task, description=text))
            report["sizes"].append(entry)
            if not keep:
                shutil.rmtree(size_work, ignore_errors=True)
            progress.advance(task)
    report["wall_s"] = time.perf_counter() - start
    report["load_average_at_end"] = list(os.getloadavg())
    summarise(report)
    write(report, out)
    return report


def write(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """crossover.json, crossover.md and crossover.png under ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "crossover.json", "md": out / "crossover.md", "png": out / "crossover.png"}
    with atomic_path(paths["json"]) as temp:
        temp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    with atomic_path(paths["md"]) as temp:
        temp.write_text(markdown(report))
    plot(report, paths["png"])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Latency of softmax against focused linear attention by image size (ORT CPU).")
    parser.add_argument("--quick", action="store_true", help="64 and 96 px, 2 rounds: checks the path, measures nothing useful")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the ONNX files are built")
    parser.add_argument("--keep", action="store_true", help="keep the ONNX files in --work")
    parser.add_argument("--render", type=Path, help="rewrite the report files from a crossover.json, timing nothing")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    if args.render:
        report = json.loads(args.render.read_text())
        summarise(report)
        write(report, args.out)
        return 0
    cfg = QUICK if args.quick else CrossoverConfig()
    command = "python -m exporter.bench.crossover" + (" --quick" if args.quick else "")
    report = run(cfg, args.out, args.work, command, console, keep=args.keep)
    console.print(f"wrote {args.out}/crossover.md, .json, .png in {report['wall_s'] / 60:.1f} min")
    for finding in report["findings"]:
        console.print(f"  {finding}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
