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
from rich.markup import escape

from exporter.checks import check_run_inputs
from exporter.latency import machine_info
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs, count_ops
from exporter.held_out import describe_quality, held_out_quality
from exporter.report import block_rows, write_outputs
from exporter.runtimes import require_runtimes
from exporter.runtimes.stages import latency_per_runtime, parity_per_runtime, runtimes_report
from exporter.stages.artifact import build_artifact, describe_parity
from exporter.stages.cache import Stages, cached_file, key_of, weights_key
from exporter.stages.config import PRECISIONS, QUANTIZE, TARGETS, RunConfig, resolve_defaults
from exporter.stages.images import Images, load_images
from exporter.stages.effort import Effort
from exporter.stages.plan import head_target, plan_stage, removes_nothing
from exporter.stages.recovery import recovery_stage
from search.core.atomic import ensure_writable_dir
from search.core.errors import OutputPathError, UserError
from search.core.runtime import Runtime, runtime
from search.heads import total_heads
from search.methods import METHODS, SEARCHES_CHANNELS
from search.models import load_model

__all__ = ["Images", "RunConfig", "load_images", "resolve_defaults", "run"]

SEARCHED = ("acp", "dsp", "dsp+acp")
"""The methods that run a search of --search-steps steps."""

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
    ensure_writable_dir(out)
    work = cfg.work_dir
    created = not work.exists()
    work.mkdir(exist_ok=True)
    try:
        with runtime(cfg.device) as rt:
            return _run(cfg, console if rt.is_main else Console(stderr=True, quiet=True), rt)
    except BaseException:
        if created and not any(work.iterdir()):
            work.rmdir()
        raise


def _run(cfg: RunConfig, console: Console, rt: Runtime) -> dict[str, Any] | None:
    stage = Stages(console)
    out, work = Path(cfg.output), cfg.work_dir
    torch.manual_seed(cfg.seed)

    with stage("load model") as notes:
        loaded = load_model(cfg.model, cfg.checkpoint, cfg.random_init, cfg.img_size, cfg.pattern)
        notes.append(f"{loaded.timm_name} @ {loaded.img_size}px, weights {loaded.weights}")
    if loaded.random_weights:
        console.print("[bold red]RANDOM WEIGHTS[/]: no checkpoint or pretrained weights; accuracy figures mean nothing")
    given, cfg = cfg, resolve_defaults(cfg, loaded.random_weights, rt.device.type)
    model = loaded.model
    geometry = loaded.geometry
    input_size = tuple(loaded.data_config["input_size"])
    identity = removes_nothing(cfg, geometry)
    effort = run_effort(given, cfg, rt, identity)
    if identity:
        cfg = replace(cfg, finetune_steps=0, search_images=min(cfg.search_images, IDENTITY_IMAGES),
                      heldout_images=min(cfg.heldout_images, IDENTITY_IMAGES))
        console.print("[dim]budget 1 removes nothing: no search and no recovery; the dense model is exported and "
                      "checked through the same path[/]")
    else:
        console.print(f"[dim]{escape(effort.describe())}[/]")
    acp = cfg.acp_config()
    if not identity:
        console.print(
            f"[dim]method {cfg.method}, budget {cfg.budget:g}, align {cfg.align}, "
            + (f"search steps {cfg.search_steps}, " if cfg.method in SEARCHED else "")
            + (f"indicator {acp.indicator} ({acp.optimiser}), widths from the {'search' if acp.widths == 'search' else 'greedy solver'}, "
               if cfg.method in SEARCHES_CHANNELS else "")
            + f"recovery steps {cfg.finetune_steps}, device {rt.device}"
            + (", images: built-in photographs (no --data)" if cfg.data is None and not loaded.random_weights else "")
            + (f", {rt.world_size} ranks" if rt.distributed else "") + "[/]"
        )

    target = head_target(cfg, geometry) if cfg.plan is None else None  # a bad K or budget fails here, before the images
    if target is not None:
        console.print(f"[dim]heads: {target.describe(geometry)}"
                      + (f"; {cfg.dsp_config().describe()}" if cfg.method.startswith("dsp") else "") + "[/]")

    with stage("images") as notes:
        images = load_images(cfg, loaded, rt.device)
        notes.append(images.label)

    wkey = weights_key(cfg, loaded)
    with stage("plan") as notes:
        plan = plan_stage(cfg, loaded, images, rt, wkey, notes)
        notes.append(f"MAC ratio {plan.mac_ratio:.4f}")
    if cfg.plan is not None or identity:
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
        if plan.removes_nothing:  # the pruned model is the dense one: one graph serves as both
            pruned_path, pruned_reused = dense_path, True
        else:
            pruned_path, pruned_reused = cached_file(work, "pruned.onnx", pruned_key, lambda p: export_onnx(pruned, p, input_size, cfg.opset))
        notes.append(f"dense {'reused' if dense_reused else 'exported'}, pruned {'reused' if pruned_reused else 'exported'}")

    with stage("count MACs in the graphs") as notes:
        onnx_dense, onnx_pruned = count_onnx_macs(dense_path), count_onnx_macs(pruned_path)
        notes.append(f"graph ratio {onnx_pruned / onnx_dense:.4f}")

    parities = parity_per_runtime(stage, cfg.runtimes, pruned_path, pruned, parity_images, loaded.is_classifier)
    parity = parities[cfg.runtimes[0]]

    threads = cfg.threads or _default_threads()
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
    latency = latencies.get(cfg.runtimes[0], [])

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
            "method": plan.method, "budget": plan.budget, "align": plan.align,
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
        "effort": effort.to_dict(),
        "recovery": recovery,
        "images": images.label,
        "fidelity": fidelity,
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
    if loaded.random_weights:
        report["warning"] = "random weights: accuracy figures mean nothing"
    write_outputs(report, artifact_path, out)
    return report
