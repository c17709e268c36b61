"""The whole run, stage by stage: model → plan → surgery → ONNX → validation → report.

Every stage's output lands in a work directory next to the output (``model.onnx`` →
``model.work/``), keyed by the inputs that produced it. Re-running the same command reuses what
is there, so a failure late in the pipeline never costs the search. The output ONNX is written
last, whole, and only after it passed parity.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx
import torch
from rich.console import Console

from exporter.latency import machine_info, measure_latency
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs, count_ops
from exporter.report import block_rows, write_report
from exporter.surgery import apply_plan
from exporter.validate import available_providers, check_parity
from search.allocate import SolverConfig, make_plan
from search.atomic import atomic_path, ensure_writable_dir
from search.data import calibration_images
from search.errors import OutputPathError
from search.macs import describe
from search.methods import METHODS, SearchInputs
from search.models import LoadedModel, load_model
from search.plan import Plan

LATENCY_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``prune-export`` run depends on.

    Attributes:
        model: bundled name, alias or timm ViT name.
        budget: fraction of dense MACs to keep, in (0, 1].
        output: the ONNX file to write.
        method: selection method (see ``search.methods``).
        align: kept widths are multiples of this.
        checkpoint: state dict to load instead of pretrained weights.
        random_init: allow random weights when no others are available.
        img_size: input resolution; None for the model's default.
        data: ImageFolder for calibration and parity; None for random inputs.
        plan: replay this plan instead of searching.
        per_head_indices: choose indices per head (same count) instead of shared indices.
        seed: seeds random weights, random scores and input sampling.
        calib_images: images used for calibration and parity.
        latency_runs: interleaved runs per model for the latency medians (0 skips latency).
        latency_batches: batch sizes to time.
        threads: ONNX Runtime intra-op threads; None for every core this process may use.
        opset: ONNX opset.
    """

    model: str
    budget: float
    output: Path
    method: str = "magnitude"
    align: int = 8
    checkpoint: Path | None = None
    random_init: bool = False
    img_size: int | None = None
    data: Path | None = None
    plan: Path | None = None
    per_head_indices: bool = False
    seed: int = 0
    calib_images: int = 16
    latency_runs: int = 20
    latency_batches: tuple[int, ...] = (1,)
    threads: int | None = None
    opset: int = 17

    @property
    def work_dir(self) -> Path:
        return self.output.with_suffix(".work")


def _key(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_file(work: Path, name: str, key: str, build: Callable[[Path], Any]) -> tuple[Path, bool]:
    """``work/name`` built by ``build(path)`` unless a file made from the same ``key`` is there.

    Returns the path and whether it was reused. The key is written after the file, so a file
    whose build was interrupted is never taken for a finished one.
    """
    path, key_path = work / name, work / f"{name}.key"
    if path.is_file() and key_path.is_file() and key_path.read_text().strip() == key:
        return path, True
    key_path.unlink(missing_ok=True)
    build(path)
    with atomic_path(key_path) as tmp:
        tmp.write_text(key + "\n")
    return path, False


class Stages:
    """Prints each stage with a spinner while it runs and a tick with its time when done."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[list[str]]:
        notes: list[str] = []
        start = time.perf_counter()
        with self.console.status(f"{name}…"):
            yield notes
        self.times[name] = round(time.perf_counter() - start, 2)
        extra = f" [dim]{'; '.join(notes)}[/]" if notes else ""
        self.console.print(f"[green]✓[/] {name} [dim]({self.times[name]:.1f} s)[/]{extra}")


def _weights_key(cfg: RunConfig, loaded: LoadedModel) -> dict[str, Any]:
    key: dict[str, Any] = {"model": loaded.timm_name, "weights": loaded.weights, "img_size": loaded.img_size}
    if cfg.checkpoint is not None:
        stat = Path(cfg.checkpoint).stat()
        key["checkpoint_stat"] = [stat.st_size, stat.st_mtime_ns]
    if loaded.random_weights:
        key["init_seed"] = cfg.seed
    return key


def _search(cfg: RunConfig, loaded: LoadedModel, images: torch.Tensor) -> Plan:
    geometry = describe(loaded.model)
    inputs = SearchInputs(model=loaded.model, geometry=geometry, images=images, seed=cfg.seed)
    scores = METHODS[cfg.method](inputs)
    solver = SolverConfig(budget=cfg.budget, align=cfg.align, per_head_indices=cfg.per_head_indices)
    return make_plan(geometry, scores, solver, model=loaded.timm_name, img_size=loaded.img_size, method=cfg.method)


def _write_plan(plan: Plan, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(plan.to_json() + "\n")


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _copy_into_place(source: Path, final: Path) -> None:
    with atomic_path(final) as tmp:
        shutil.copyfile(source, tmp)


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(cfg: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the pipeline and return the report; writes ``cfg.output`` and its report files.

    Raises UserError subclasses for bad input or a failed check; nothing is written to
    ``cfg.output`` then, and the finished stages stay in the work directory.
    """
    console = console or Console(stderr=True)
    stage = Stages(console)
    out = Path(cfg.output)
    if out.suffix != ".onnx":
        raise OutputPathError(f"-o {out} must name a .onnx file (the report goes next to it)")
    ensure_writable_dir(out)
    work = cfg.work_dir
    work.mkdir(exist_ok=True)
    torch.manual_seed(cfg.seed)

    with stage("load model") as notes:
        loaded = load_model(cfg.model, cfg.checkpoint, cfg.random_init, cfg.img_size)
        notes.append(f"{loaded.timm_name} @ {loaded.img_size}px, weights {loaded.weights}")
    if loaded.random_weights:
        console.print("[bold red]RANDOM WEIGHTS[/]: no checkpoint or pretrained weights; accuracy figures mean nothing")
    model = loaded.model
    geometry = describe(model)
    input_size = tuple(loaded.data_config["input_size"])

    with stage("calibration images") as notes:
        images, images_label = calibration_images(cfg.data, loaded.data_config, cfg.calib_images, cfg.seed)
        notes.append(images_label)

    weights_key = _weights_key(cfg, loaded)
    with stage("plan") as notes:
        if cfg.plan is not None:
            plan = Plan.load(cfg.plan)
            plan.check(geometry, loaded.timm_name)
            notes.append(f"replayed {cfg.plan}")
        else:
            search_key = _key(
                **weights_key, method=cfg.method, budget=cfg.budget, align=cfg.align,
                per_head=cfg.per_head_indices, seed=cfg.seed, data=str(cfg.data), calib=cfg.calib_images,
            )
            plan_path, reused = cached_file(work, "plan.json", search_key, lambda p: _write_plan(_search(cfg, loaded, images), p))
            plan = Plan.load(plan_path)
            notes.append(("resumed " if reused else "searched, saved ") + str(plan_path))
        notes.append(f"MAC ratio {plan.mac_ratio:.4f}")

    with stage("surgery"):
        pruned = apply_plan(model, plan)

    with stage("export ONNX") as notes:
        dense_path, dense_reused = cached_file(
            work, "dense.onnx", _key(**weights_key, opset=cfg.opset), lambda p: export_onnx(model, p, input_size, cfg.opset)
        )
        pruned_path, pruned_reused = cached_file(
            work, "pruned.onnx", _key(**weights_key, plan=plan.to_json(), opset=cfg.opset),
            lambda p: export_onnx(pruned, p, input_size, cfg.opset),
        )
        notes.append(f"dense {'reused' if dense_reused else 'exported'}, pruned {'reused' if pruned_reused else 'exported'}")

    with stage("count MACs in the graphs") as notes:
        onnx_dense, onnx_pruned = count_onnx_macs(dense_path), count_onnx_macs(pruned_path)
        notes.append(f"graph ratio {onnx_pruned / onnx_dense:.4f}")

    with stage("parity in ONNX Runtime") as notes:
        parity = check_parity(pruned_path, pruned, images, classifier=loaded.is_classifier)
        notes.append(f"max |Δ| {parity.max_abs_diff:.2e}, cosine {parity.min_cosine:.6f}")

    latency: list[dict[str, Any]] = []
    threads = cfg.threads or _default_threads()
    if cfg.latency_runs > 0:
        providers = [p for p in LATENCY_PROVIDERS if p in available_providers()]
        for provider in providers:
            for batch in cfg.latency_batches:
                with stage(f"latency {provider.removesuffix('ExecutionProvider')} batch {batch}") as notes:
                    result = measure_latency(
                        {"dense": dense_path, "pruned": pruned_path}, batch=batch, threads=threads,
                        runs=cfg.latency_runs, provider=provider, input_size=input_size, seed=cfg.seed,
                    )
                    entry = {**asdict(result), "ratio": result.ratio("pruned", "dense")}
                    latency.append(entry)
                    notes.append(f"ratio {entry['ratio']:.3f}")

    _copy_into_place(pruned_path, out)
    graph = onnx.load(str(out), load_external_data=False)
    report: dict[str, Any] = {
        "tool": "prune-export",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": loaded.name, "timm_name": loaded.timm_name, "weights": loaded.weights,
            "random_weights": loaded.random_weights, "img_size": loaded.img_size, "classifier": loaded.is_classifier,
        },
        "plan": {
            "method": plan.method, "budget": plan.budget, "align": plan.align,
            "per_head_indices": not all(b.shared_indices for b in plan.blocks),
            "path": str(cfg.plan or work / "plan.json"),
        },
        "macs": {
            "dense": plan.dense_macs, "pruned": plan.pruned_macs, "ratio": plan.mac_ratio,
            "onnx_dense": onnx_dense, "onnx_pruned": onnx_pruned, "onnx_ratio": onnx_pruned / onnx_dense,
        },
        "params": {"dense": _params(model), "pruned": _params(pruned), "ratio": _params(pruned) / _params(model)},
        "blocks": block_rows(plan, geometry),
        "parity": {**asdict(parity), "inputs": images_label, "reference": "PyTorch pruned model"},
        "latency": latency,
        "machine": {**machine_info(), "threads": threads},
        "preprocessing": {k: loaded.data_config[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct") if k in loaded.data_config},
        "onnx": {
            "path": str(out),
            "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "input": "input", "output": "output", "dynamic_batch": True,
            "ops": count_ops(out),
        },
        "stage_seconds": stage.times,
    }
    if loaded.random_weights:
        report["warning"] = "random weights: accuracy figures mean nothing"
    write_report(report, out)
    return report
