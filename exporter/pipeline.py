"""The whole run, stage by stage: model → images → plan → surgery and recovery → ONNX → validation → report.

Every stage's output lands in a work directory next to the output (``model.onnx`` →
``model.work/``), keyed by the inputs that produced it. Re-running the same command reuses what
is there, so a failure late in the pipeline never costs the search. The output ONNX is written
last, whole, and only after it passed parity. Each stage is a module of ``exporter.stages``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch
from rich.console import Console

from exporter.checks import check_run_inputs
from exporter.latency import machine_info
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs, count_ops
from exporter.recovery import knn_accuracy
from exporter.report import block_rows, write_outputs
from exporter.runtimes import require_runtimes
from exporter.runtimes.stages import latency_per_runtime, parity_per_runtime, runtimes_report
from exporter.stages.artifact import build_artifact, describe_parity
from exporter.stages.cache import Stages, cached_file, key_of, weights_key
from exporter.stages.config import PRECISIONS, QUANTIZE, TARGETS, RunConfig, resolve_defaults
from exporter.stages.images import Images, load_images
from exporter.stages.latency import (cheapest_ratio, check_latency_options, check_reachable, corrected_budget, cost_stage,
                                     latency_model_section, measure_target, resolve_align)
from exporter.stages.plan import head_target, plan_stage
from exporter.stages.recovery import recovery_stage
from search.core.atomic import ensure_writable_dir
from search.core.errors import OutputPathError, UserError
from search.core.runtime import Runtime, runtime
from search.cost import cost_ratio
from search.heads import total_heads
from search.methods import METHODS, SEARCHES_CHANNELS
from search.models import load_model

__all__ = ["Images", "RunConfig", "load_images", "resolve_defaults", "run"]

SEARCHED = ("acp", "dsp", "dsp+acp")
"""The methods that run a search of --search-steps steps."""


def table_ratio(table: Any, geometry: Any, plan: Any) -> float:
    """The latency ratio ``table`` predicts for ``plan``."""
    return cost_ratio(table, geometry, plan.widths())


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(cfg: RunConfig, console: Console | None = None) -> dict[str, Any] | None:
    """Run the pipeline and return the report; writes ``cfg.output`` and its report files.

    Under torchrun every rank takes part in the search and the recovery; rank 0 alone exports,
    validates and writes, and the other ranks return None.

    Raises UserError subclasses for bad input or a failed check; nothing is written to
    ``cfg.output`` then, and the finished stages stay in the work directory.
    """
    console = console or Console(stderr=True)
    out = Path(cfg.output)
    if out.suffix != ".onnx":
        raise OutputPathError(f"-o {out} must name a .onnx file (the report goes next to it)")
    if cfg.method is not None and cfg.method not in METHODS:
        raise UserError(f"unknown method '{cfg.method}'; choose one of {', '.join(METHODS)}")
    for name, value, allowed in (("target", cfg.target, TARGETS), ("precision", cfg.precision, PRECISIONS),
                                 ("quantize", cfg.quantize, QUANTIZE), ("quantize-mode", cfg.quantize_mode, ("dynamic", "static"))):
        if value not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(allowed)}, got '{value}'")
    if cfg.precision == "fp16" and cfg.quantize != "none":
        raise UserError("--precision fp16 and --quantize int8 exclude each other; choose one")
    require_runtimes(cfg.runtimes)
    check_run_inputs(cfg)
    check_latency_options(cfg)
    ensure_writable_dir(out)
    work = cfg.work_dir
    created = not work.exists()
    work.mkdir(exist_ok=True)
    try:
        with runtime(cfg.device) as rt:
            shown = console if rt.is_main else Console(stderr=True, quiet=True)
            result = _run(cfg, shown, rt)
            if isinstance(result, _Replan):  # the measured latency missed the budget: one correction round
                shown.print(f"[yellow]latency: {result.reason}; re-planning once with the solver aiming at "
                            f"{result.budget:.4f}[/]")
                result = _run(replace(cfg, solver_budget=result.budget, latency_correction=result.record), shown, rt)
            assert not isinstance(result, _Replan), "one correction round at most"
            return result
    except BaseException:
        if created and not any(work.iterdir()):
            work.rmdir()
        raise


class _Replan:
    """What a first round returns when its measured latency missed the latency budget."""

    def __init__(self, budget: float, record: dict[str, Any], reason: str) -> None:
        self.budget, self.record, self.reason = budget, record, reason


def _run(cfg: RunConfig, console: Console, rt: Runtime) -> dict[str, Any] | _Replan | None:
    stage = Stages(console)
    out, work = Path(cfg.output), cfg.work_dir
    torch.manual_seed(cfg.seed)

    with stage("load model") as notes:
        loaded = load_model(cfg.model, cfg.checkpoint, cfg.random_init, cfg.img_size, cfg.pattern)
        notes.append(f"{loaded.timm_name} @ {loaded.img_size}px, weights {loaded.weights}")
    if loaded.random_weights:
        console.print("[bold red]RANDOM WEIGHTS[/]: no checkpoint or pretrained weights; accuracy figures mean nothing")
    cfg = resolve_defaults(cfg, loaded.random_weights)
    model = loaded.model
    geometry = loaded.geometry
    input_size = tuple(loaded.data_config["input_size"])
    acp = cfg.acp_config()
    console.print(
        f"[dim]method {cfg.method}, {'latency ' if cfg.latency_budget is not None else ''}budget {cfg.budget:g}, "
        f"align {'auto' if cfg.align is None else cfg.align}, "
        + (f"search steps {cfg.search_steps}, " if cfg.method in SEARCHED else "")
        + (f"indicator {acp.indicator} ({acp.optimiser}), widths from the {'search' if acp.widths == 'search' else 'greedy solver'}, "
           if cfg.method in SEARCHES_CHANNELS else "")
        + f"recovery steps {cfg.finetune_steps}, device {rt.device}"
        + (", images: built-in photographs (no --data)" if cfg.data is None and not loaded.random_weights else "")
        + (f", {rt.world_size} ranks" if rt.distributed else "") + "[/]"
    )

    threads = cfg.threads or _default_threads()
    cost, table, latency_target, table_path, table_reused = cost_stage(cfg, loaded, stage, threads)
    if cfg.align is None:
        cfg = replace(cfg, align=resolve_align(cfg, table))
        console.print(f"[dim]--align auto: {cfg.align} ({'from the latency table' if table else 'no latency table, so 8'})[/]")
    if cfg.plan is None:
        check_reachable(cfg, geometry, cost, cfg.align)
    target = head_target(cfg, geometry, cost) if cfg.plan is None else None  # a bad K or budget fails here, before the images
    if target is not None:
        console.print(f"[dim]heads: {target.describe(geometry)}"
                      + (f"; {cfg.dsp_config().describe()}" if cfg.method.startswith("dsp") else "") + "[/]")

    with stage("images") as notes:
        images = load_images(cfg, loaded)
        notes.append(images.label)

    wkey = weights_key(cfg, loaded)
    with stage("plan") as notes:
        plan = plan_stage(cfg, loaded, images, rt, wkey, notes, cost)
        notes.append(f"MAC ratio {plan.mac_ratio:.4f}" + ("" if plan.cost_ratio is None else f", predicted latency ratio {plan.cost_ratio:.4f}"))
    if cfg.plan is not None:
        cfg = replace(cfg, method=plan.method)

    with stage("surgery and recovery") as notes:
        pruned, recovery = recovery_stage(cfg, loaded, plan, images, rt, wkey, notes)
    if not rt.is_main:
        return None

    parity_images = images.held_out.images[: cfg.calib_images]
    pruned_key = key_of(**wkey, plan=plan.to_json(), recovery=recovery, opset=cfg.opset)
    with stage("export ONNX") as notes:
        dense_path, dense_reused = cached_file(
            work, "dense.onnx", key_of(**wkey, opset=cfg.opset), lambda p: export_onnx(model, p, input_size, cfg.opset)
        )
        pruned_path, pruned_reused = cached_file(work, "pruned.onnx", pruned_key, lambda p: export_onnx(pruned, p, input_size, cfg.opset))
        notes.append(f"dense {'reused' if dense_reused else 'exported'}, pruned {'reused' if pruned_reused else 'exported'}")

    with stage("count MACs in the graphs") as notes:
        onnx_dense, onnx_pruned = count_onnx_macs(dense_path), count_onnx_macs(pruned_path)
        notes.append(f"graph ratio {onnx_pruned / onnx_dense:.4f}")

    parities = parity_per_runtime(stage, cfg.runtimes, pruned_path, pruned, parity_images, loaded.is_classifier)
    parity = parities[cfg.runtimes[0]]

    with stage(f"artifact: {cfg.target}, {cfg.precision}" + ("" if cfg.quantize == "none" else f", {cfg.quantize} {cfg.quantize_mode}")) as notes:
        artifact_path, artifact_parity = build_artifact(cfg, pruned_path, asdict(parity), pruned, geometry, images, parity_images, loaded.is_classifier, threads,
                                                       random_weights=loaded.random_weights)
        notes.append(describe_parity(artifact_parity))

    accuracy = None
    if images.held_out.labels is not None and not loaded.is_classifier:
        with stage("held-out k-NN accuracy") as notes:
            cpu = Runtime(torch.device("cpu"))
            accuracy = {
                "metric": "k-NN top-1 (k=20, T=0.07), half the held-out images as bank, half as queries",
                "held_out_images": len(images.held_out.images),
                "dense": knn_accuracy(model, images.held_out, cpu),
                "pruned": knn_accuracy(pruned, images.held_out, cpu),
            }
            notes.append(f"dense {accuracy['dense']:.4f}, pruned {accuracy['pruned']:.4f}")

    latencies: dict[str, list[dict[str, Any]]] = {}
    if cfg.latency_runs > 0:
        latencies = latency_per_runtime(stage, cfg.runtimes, {"dense": dense_path, "pruned": artifact_path},
                                        cfg.latency_batches, threads, cfg.latency_runs, input_size, cfg.seed)
    latency = latencies.get(cfg.runtimes[0], [])
    latency_model = None
    if table is not None and latency_target is not None:
        measured = None
        if cfg.latency_runs > 0:
            with stage(f"latency on the target: {latency_target.label}") as notes:
                measured = measure_target(cfg, latency_target, (dense_path, model), (pruned_path, pruned), input_size,
                                          latencies, cfg.latency_runs)
                notes.append(f"measured {measured['measured_ratio']:.3f} ± {measured['noise']:.3f}, "
                             f"predicted {table_ratio(table, geometry, plan):.3f} ({measured['measured_by']})")
        latency_model = latency_model_section(cfg, plan, geometry, table, latency_target, table_path, table_reused, measured)
        if measured is not None and cfg.latency_budget is not None and cfg.latency_correction is None:
            budget = corrected_budget(cfg.latency_budget, cfg.solver_budget or cfg.latency_budget,
                                      latency_model["predicted_ratio"], measured["measured_ratio"], measured["noise"])
            if budget is not None:
                budget = max(budget, cheapest_ratio(cfg, geometry, cost) * (1 + 1e-9))  # the best a correction can do
                record = {"first_round": {k: latency_model[k] for k in ("predicted_ratio", "measured_ratio", "noise")},
                          "solver_budget": budget}
                return _Replan(budget, record, f"measured {measured['measured_ratio']:.3f} against a budget of "
                                               f"{cfg.latency_budget:g} (noise {measured['noise']:.3f})")

    graph = onnx.load(str(artifact_path), load_external_data=False)
    parity_notes = {"inputs": images.label, "reference": "PyTorch pruned model", "graph": "portable fp32"}
    report: dict[str, Any] = {
        "tool": "prune-export",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": loaded.name, "timm_name": loaded.timm_name, "weights": loaded.weights,
            "random_weights": loaded.random_weights, "img_size": loaded.img_size, "classifier": loaded.is_classifier,
        },
        "plan": {
            "method": plan.method, "budget": cfg.budget, "align": plan.align, "cost": plan.cost,
            **({"solver_budget": plan.budget} if plan.budget != cfg.budget else {}),
            "per_head_indices": not all(b.shared_indices for b in plan.blocks),
            "path": str(cfg.plan or work / "plan.json"),
        },
        "search": {
            "method": cfg.method, "device": str(rt.device), "ranks": rt.world_size,
            **({"steps": cfg.search_steps} if cfg.method in SEARCHED else {}),
            **({"similarity": cfg.similarity, "attn_init": cfg.attn_init, "indicator": acp.indicator, "widths": acp.widths,
                "gate_optimiser": acp.optimiser} if cfg.method in SEARCHES_CHANNELS else {}),
            **({"heads": {"kept": target.total, "of": total_heads(geometry), "scope": target.scope, "source": target.source}}
               if target is not None else {}),
            **({"dsp": asdict(cfg.dsp_config()) | {"cooldown": cfg.dsp_config().cooldown_steps}}
               if target is not None and cfg.method.startswith("dsp") else {}),
        },
        "recovery": recovery,
        "images": images.label,
        "accuracy": accuracy,
        "macs": {
            "dense": plan.dense_macs, "pruned": plan.pruned_macs, "ratio": plan.mac_ratio,
            "onnx_dense": onnx_dense, "onnx_pruned": onnx_pruned, "onnx_ratio": onnx_pruned / onnx_dense,
        },
        "params": {"dense": _params(model), "pruned": _params(pruned), "ratio": _params(pruned) / _params(model)},
        "blocks": block_rows(plan, geometry),
        "parity": {**asdict(parity), **parity_notes},
        "runtimes": runtimes_report(parities, latencies, parity_notes),
        "artifact": {"target": cfg.target, "precision": cfg.precision, "quantize": cfg.quantize,
                     "quantize_mode": cfg.quantize_mode if cfg.quantize != "none" else None, "parity": artifact_parity},
        "latency": latency,
        "machine": {**machine_info(cfg.runtimes), "threads": threads},
        "preprocessing": {k: loaded.data_config[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct") if k in loaded.data_config},
        "onnx": {
            "path": str(out),
            "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "input": "input", "output": "output", "dynamic_batch": True,
            "ops": count_ops(artifact_path),
        },
        "stage_seconds": stage.times,
    }
    if latency_model is not None:
        report["latency_model"] = latency_model
    if loaded.random_weights:
        report["warning"] = "random weights: accuracy figures mean nothing"
    write_outputs(report, artifact_path, out)
    return report
