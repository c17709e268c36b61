"""The whole run, stage by stage: model → images → plan → surgery and recovery → ONNX → validation → report.

Every stage's output lands in a work directory next to the output (``model.onnx`` →
``model.work/``), keyed by the inputs that produced it. Re-running the same command reuses what
is there, so a failure late in the pipeline never costs the search. The output ONNX is written
last, whole, and only after it passed parity. Each stage is a module of ``exporter.stages``.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from exporter.input_checks import check_run_inputs, unused_pixels_warning
from exporter.onnx_export import export_onnx
from exporter.held_out import describe_quality, held_out_quality
from exporter.onnx_macs import count_onnx_macs
from exporter.report import write_outputs
from exporter.runtimes import require_runtimes
from exporter.stages.runtimes import latency_per_runtime, parity_per_runtime
from exporter.stages.artifact import build_artifact, describe_parity
from exporter.stages.cache import Stages, cached_file, key_of, weights_key
from exporter.stages.config import PRECISIONS, QUANTIZE, TARGETS, RunConfig, resolve_defaults
from exporter.stages.images import Images, load_images
from exporter.stages.effort import Effort
from exporter.stages.latency import (cheapest_ratio, check_latency_options, check_reachable, corrected_budget, cost_stage,
                                     latency_model_section, measure_target, resolve_align, table_check_warning)
from exporter.stages.plan import head_target, plan_stage, removes_nothing
from exporter.pruned_file import save_pruned
from exporter.stages.recovery import recovery_stage
from exporter.stages.workdir import release_work_dir
from exporter.summary import SEARCHED, RunResults, build_report
from search.core.atomic import ensure_writable_dir
from search.core.errors import OutputPathError, UserError
from search.core.runtime import Runtime, runtime
from search.budget.cost import cost_ratio
from search.methods.registry import METHODS, SEARCHES_CHANNELS
from search.models.load import load_model

__all__ = ["Images", "RunConfig", "load_images", "resolve_defaults", "run"]

IDENTITY_IMAGES = 32
"""Pool and held-out images a run that removes nothing draws: static int8 calibration reads the pool, parity
and fidelity the held-out ones (a dense fp32 file is the dense model, so a few suffice to show it)."""


def run_effort(given: RunConfig, resolved: RunConfig, rt: Runtime, identity: bool) -> Effort:
    """The effort a run spends, as the terminal and the report give it: the level of the options as
    given, with the recovery the weights allow (``resolved``)."""
    effort = given.effort_for(rt.device.type)
    if identity:
        return replace(effort, search_steps=0, finetune_steps=0, reason="budget 1 removes nothing: no search, no recovery")
    if resolved.finetune_steps != effort.finetune_steps:
        return replace(effort, finetune_steps=resolved.finetune_steps, reason=effort.reason + "; random weights: no recovery")
    return effort

def table_ratio(table: Any, geometry: Any, plan: Any) -> float:
    """The latency ratio ``table`` predicts for ``plan``."""
    return cost_ratio(table, geometry, plan.widths())



def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(cfg: RunConfig, console: Console | None = None) -> dict[str, Any] | None:
    """Run the pipeline and return the report; writes ``cfg.output`` and its report files.

    Under torchrun every rank takes part in the search and the recovery; rank 0 alone exports,
    validates and writes, and the other ranks return None.

    Raises UserError subclasses for bad input or a failed check; nothing is written to
    ``cfg.output`` then, and the finished stages stay in the work directory. After a successful
    run the work directory is removed unless ``cfg.keep_work`` (its size is printed either way).
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
            report = result
    except BaseException:
        if created and not any(work.iterdir()):
            work.rmdir()
        raise
    if report is not None:
        release_work_dir(work, cfg.keep_work, console)
    return report


class _Replan:
    """What a first round returns when its measured latency missed the latency budget."""

    def __init__(self, budget: float, record: dict[str, Any], reason: str) -> None:
        self.budget, self.record, self.reason = budget, record, reason


def _say_what_runs(cfg: RunConfig, acp: Any, effort: Effort, identity: bool, random_weights: bool, rt: Runtime,
                   console: Console) -> None:
    """One dim line of what the run will do: the effort's numbers, or that budget 1 removes nothing; then the method."""
    if identity:
        console.print("[dim]budget 1 removes nothing: no search and no recovery; the dense model is exported and "
                      "checked through the same path[/]")
        return
    console.print(f"[dim]{escape(effort.describe())}[/]")
    console.print(
        f"[dim]method {cfg.method}, {'latency ' if cfg.latency_budget is not None else ''}budget {cfg.budget:g}, "
        f"align {'auto' if cfg.align is None else cfg.align}, "
        + (f"search steps {cfg.search_steps}, " if cfg.method in SEARCHED else "")
        + (f"indicator {acp.indicator} ({acp.optimiser}), widths from the {'search' if acp.widths == 'search' else 'greedy solver'}, "
           if cfg.method in SEARCHES_CHANNELS else "")
        + f"recovery steps {cfg.finetune_steps}, device {rt.device}"
        + (", images: built-in photographs (no --data)" if cfg.data is None and not random_weights else "")
        + (f", {rt.world_size} ranks" if rt.distributed else "") + "[/]"
    )


def _latency_on_target(cfg: RunConfig, stage: Stages, latency_target: Any, table: Any, table_path: Any, table_reused: bool,
                       cost: Any, geometry: Any, plan: Any, dense: tuple[Path, Any], pruned: tuple[Path, Any],
                       input_size: tuple[int, ...], latencies: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], _Replan | None]:
    """The report's latency-model section: predicted against measured on the target, and, when a latency
    budget was missed by more than the noise on the first round, the re-plan that corrects it."""
    measured = None
    if cfg.latency_runs > 0:
        with stage(f"latency on the target: {latency_target.label}") as notes:
            measured = measure_target(cfg, latency_target, dense, pruned, input_size, latencies, cfg.latency_runs)
            notes.append(f"measured {measured['measured_ratio']:.3f} ± {measured['noise']:.3f}, "
                         f"predicted {table_ratio(table, geometry, plan):.3f} ({measured['measured_by']})")
    section = latency_model_section(cfg, plan, geometry, table, latency_target, table_path, table_reused, measured)
    if measured is None or cfg.latency_budget is None or cfg.latency_correction is not None:
        return section, None
    budget = corrected_budget(cfg.latency_budget, cfg.solver_budget or cfg.latency_budget,
                              section["predicted_ratio"], measured["measured_ratio"], measured["noise"])
    if budget is None:
        return section, None
    budget = max(budget, cheapest_ratio(cfg, geometry, cost) * (1 + 1e-9))  # the best a correction can do
    record = {"first_round": {k: section[k] for k in ("predicted_ratio", "measured_ratio", "noise")}, "solver_budget": budget}
    return section, _Replan(budget, record, f"measured {measured['measured_ratio']:.3f} against a budget of "
                                            f"{cfg.latency_budget:g} (noise {measured['noise']:.3f})")


def _run(cfg: RunConfig, console: Console, rt: Runtime) -> dict[str, Any] | _Replan | None:
    started = time.perf_counter()
    stage = Stages(console)
    out, work = Path(cfg.output), cfg.work_dir
    torch.manual_seed(cfg.seed)

    with stage("load model") as notes:
        loaded = load_model(cfg.model, cfg.checkpoint, cfg.random_init, cfg.img_size, cfg.pattern, cfg.num_classes,
                            dict(cfg.model_args))
        notes.append(f"{loaded.timm_name} @ {loaded.img_size}px, weights {loaded.weights}")
        notes.extend(loaded.notes)
    if loaded.random_weights:
        console.print("[bold red]RANDOM WEIGHTS[/]: no checkpoint or pretrained weights; accuracy figures mean nothing")
    warnings = [w for w in (unused_pixels_warning(loaded.model, loaded.img_size),) if w]
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    given, cfg = cfg, resolve_defaults(cfg, loaded.random_weights, rt.device.type)
    model = loaded.model
    geometry = loaded.geometry
    input_size = tuple(loaded.data_config["input_size"])
    identity = removes_nothing(cfg, geometry)
    effort = run_effort(given, cfg, rt, identity)
    if identity:
        cfg = replace(cfg, finetune_steps=0, search_images=min(cfg.search_images, IDENTITY_IMAGES),
                      heldout_images=min(cfg.heldout_images, IDENTITY_IMAGES))
    acp = cfg.acp_config()
    _say_what_runs(cfg, acp, effort, identity, loaded.random_weights, rt, console)

    threads = cfg.threads or _default_threads()
    cost, table, latency_target, table_path, table_reused = cost_stage(cfg, loaded, stage, threads)
    if (warning := table_check_warning(cfg, table)) is not None:
        warnings.append(warning)
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if cfg.align is None:
        cfg = replace(cfg, align=resolve_align(cfg, table, geometry, cost))
        console.print(f"[dim]--align auto: {cfg.align} ({'from the latency table' if table else 'no latency table, so 8'})[/]")
    if cfg.plan is None:
        check_reachable(cfg, geometry, cost, cfg.align)
    target = head_target(cfg, geometry, cost) if cfg.plan is None else None  # a bad K or budget fails here, before the images
    if target is not None:
        console.print(f"[dim]heads: {target.describe(geometry)}"
                      + (f"; {cfg.dsp_config().describe()}" if cfg.method.startswith("dsp") else "") + "[/]")

    with stage("images") as notes:
        images = load_images(cfg, loaded, rt.device)
        notes.append(images.label)

    wkey = weights_key(cfg, loaded)
    with stage("plan") as notes:
        plan = plan_stage(cfg, loaded, images, rt, wkey, notes, cost)
        notes.append(f"MAC ratio {plan.mac_ratio:.4f}" + ("" if plan.cost_ratio is None else f", predicted latency ratio {plan.cost_ratio:.4f}"))
    if cfg.plan is not None or identity:
        cfg = replace(cfg, method=plan.method)

    with stage("surgery and recovery") as notes:
        pruned, recovery, compensation, plan = recovery_stage(cfg, loaded, plan, images, rt, wkey, notes)
    if not rt.is_main:
        return None

    parity_images = images.held_out.images[: cfg.calib_images]
    pruned_key = key_of(**wkey, plan=plan.to_json(), recovery=recovery, compensation=compensation, opset=cfg.opset)
    with stage("export ONNX") as notes:
        dense_path, dense_reused = cached_file(
            work, "dense.onnx", key_of(**wkey, opset=cfg.opset), lambda p: export_onnx(model, p, input_size, cfg.opset)
        )
        if plan.removes_nothing:  # the pruned model is the dense one: one graph serves as both
            pruned_path, pruned_reused = dense_path, True
        else:
            pruned_path, pruned_reused = cached_file(work, "pruned.onnx", pruned_key, lambda p: export_onnx(pruned, p, input_size, cfg.opset))
        notes.append(f"dense {'reused' if dense_reused else 'exported'}, pruned {'reused' if pruned_reused else 'exported'}")

    with stage("count MACs in the graphs") as notes:
        onnx_dense, onnx_pruned = count_onnx_macs(dense_path), count_onnx_macs(pruned_path)
        notes.append(f"graph ratio {onnx_pruned / onnx_dense:.4f}")

    parities = parity_per_runtime(stage, cfg.runtimes, pruned_path, pruned, parity_images, loaded.is_classifier)
    parity = parities[cfg.runtimes[0]]  # the first runtime's: the report's top-level "parity"

    with stage(f"artifact: {cfg.target}, {cfg.precision}" + ("" if cfg.quantize == "none" else f", {cfg.quantize} {cfg.quantize_mode}")) as notes:
        artifact_path, artifact_parity = build_artifact(cfg, pruned_path, asdict(parity), pruned, geometry, images, parity_images, loaded.is_classifier, threads,
                                                       random_weights=loaded.random_weights)
        notes.append(describe_parity(artifact_parity))

    with stage("fidelity to dense") as notes:
        kept = held_out_quality(model, artifact_path, images, loaded.is_classifier, threads)
        notes.append(describe_quality(kept))
    fidelity, accuracy = kept["fidelity"], kept["accuracy"]

    latencies: dict[str, list[dict[str, Any]]] = {}
    if cfg.latency_runs > 0:
        latencies = latency_per_runtime(stage, cfg.runtimes, {"dense": dense_path, "pruned": artifact_path},
                                        cfg.latency_batches, threads, cfg.latency_runs, input_size, cfg.seed)
    latency_model = None
    if table is not None and latency_target is not None:
        latency_model, replan = _latency_on_target(cfg, stage, latency_target, table, table_path, table_reused, cost, geometry, plan,
                                                   (dense_path, model), (pruned_path, pruned), input_size, latencies)
        if replan is not None:
            return replan

    report = build_report(RunResults(
        cfg=cfg, loaded=loaded, pruned=pruned, plan=plan, acp=acp, target=target, runtime=rt, images=images,
        recovery=recovery, compensation=compensation, accuracy=accuracy, fidelity=fidelity, effort=effort.to_dict(), graph_macs=(onnx_dense, onnx_pruned), parities=parities,
        artifact=artifact_path, artifact_parity=artifact_parity, latencies=latencies, threads=threads,
        stage_seconds=stage.times, wall_seconds=time.perf_counter() - started, warnings=tuple(warnings),
        latency_model=latency_model,
    ))
    dense = {"model": cfg.model, "checkpoint": None if cfg.checkpoint is None else str(Path(cfg.checkpoint).resolve()),
             "num_classes": cfg.num_classes, "model_args": [list(a) for a in cfg.model_args], "pattern": cfg.pattern,
             "img_size": loaded.img_size, "random_init": loaded.random_weights}
    write_outputs(report, artifact_path, out,
                  lambda path: save_pruned(path, pruned, plan, loaded.timm_name, loaded.create_args, dense))
    return report
