"""The report of a run, built from its stages' results: the one dict the JSON, the Markdown, the table and the ONNX metadata all read.

``exporter.pipeline`` collects what each stage returned into :class:`RunResults`; :func:`build_report`
turns it into the report dict (JSON-ready). Sections other stages add (``effort``, ``fidelity``,
``latency_model``) are optional fields, copied when present. Rendering lives in
``exporter.report_text``, writing in ``exporter.report``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch

from exporter.timing import machine_info
from exporter.onnx_macs import count_ops
from exporter.report import block_rows
from exporter.stages.recovery import COMPENSATED_PLAN
from exporter.stages.runtimes import runtimes_report
from exporter.stages.config import RunConfig
from exporter.stages.images import Images
from exporter.stages.workdir import folder_bytes
from search.methods.acp import AcpConfig
from search.core.runtime import Runtime
from search.methods.heads import HeadTarget, total_heads
from search.methods.registry import SEARCHES_CHANNELS
from search.models.load import LoadedModel
from search.budget.macs import parameter_count
from search.budget.plan import Plan

SEARCHED = ("acp", "dsp", "dsp+acp")
"""The methods that run a search of --search-steps steps."""

PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


@dataclass(frozen=True)
class RunResults:
    """What the stages of one run produced, for the report.

    Attributes:
        cfg: the run's settings, defaults resolved.
        loaded: the dense model and where its weights came from.
        pruned: the pruned (and recovered) PyTorch model.
        plan: the plan that was cut.
        acp: the acp settings (reported for the methods that search channels).
        target: the head-pruning target, None for channel-only methods or a replayed plan.
        runtime: where search and recovery ran.
        images: the images the run learned from and checked on.
        recovery: the recovery summary, None without recovery.
        compensation: the compensation summary (``exporter.compensation``), None without it.
        accuracy: held-out k-NN accuracy (labelled --data on a backbone), else None.
        graph_macs: MACs counted in the dense and pruned ONNX graphs.
        parities: parity of the portable graph per runtime (first: the report's top-level "parity").
        artifact: the file shipped (portable, ORT-optimised, fp16 or int8).
        artifact_parity: that file's own parity figures.
        latencies: latency entries per runtime.
        threads: inference threads used for parity and latency.
        stage_seconds: each stage's time.
        wall_seconds: the run's wall time up to the report.
        warnings: things the user should know (random weights, unused pixels, ...).
        effort, fidelity, latency_model: sections other stages add; copied as they are when given.
    """

    cfg: RunConfig
    loaded: LoadedModel
    pruned: torch.nn.Module
    plan: Plan
    acp: AcpConfig
    target: HeadTarget | None
    runtime: Runtime
    images: Images
    recovery: dict[str, Any] | None
    compensation: dict[str, Any] | None
    accuracy: dict[str, Any] | None
    graph_macs: tuple[int, int]
    parities: dict[str, Any]
    artifact: Path
    artifact_parity: dict[str, Any]
    latencies: dict[str, list[dict[str, Any]]]
    threads: int
    stage_seconds: dict[str, float]
    wall_seconds: float
    warnings: tuple[str, ...] = ()
    effort: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    latency_model: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _search_section(r: RunResults) -> dict[str, Any]:
    cfg, acp, target, geometry = r.cfg, r.acp, r.target, r.loaded.geometry
    section: dict[str, Any] = {"method": cfg.method, "device": str(r.runtime.device), "ranks": r.runtime.world_size}
    if cfg.method in SEARCHED:
        section["steps"] = cfg.search_steps
    if cfg.method in SEARCHES_CHANNELS:
        section |= {"similarity": cfg.similarity, "attn_init": cfg.attn_init, "indicator": acp.indicator,
                    "widths": acp.widths, "gate_optimiser": acp.optimiser}
    if target is not None:
        section["heads"] = {"kept": target.total, "of": total_heads(geometry), "scope": target.scope, "source": target.source}
        if cfg.method.startswith("dsp"):
            section["dsp"] = asdict(cfg.dsp_config()) | {"cooldown": cfg.dsp_config().cooldown_steps}
    section["images"] = {"search": cfg.search_images, "held_out": cfg.heldout_images, "seed": cfg.seed}
    return section


def _plan_path(cfg: Any, work: Path, compensation: dict[str, Any] | None) -> str | None:
    """Where the plan the exported model keeps is saved: the replayed file, unless compensation re-chose its
    indices; else the work folder's, when it is kept."""
    rechosen = bool(compensation and compensation.get("rechosen"))
    if cfg.plan is not None and not rechosen:
        return str(cfg.plan)
    return str(work / (COMPENSATED_PLAN if rechosen else "plan.json")) if cfg.keep_work else None


def build_report(r: RunResults) -> dict[str, Any]:
    """The report dict of a finished run (before its files are written)."""
    cfg, loaded, plan = r.cfg, r.loaded, r.plan
    out, work = Path(cfg.output), cfg.work_dir
    dense_params, pruned_params = parameter_count(loaded.model), parameter_count(r.pruned)
    onnx_dense, onnx_pruned = r.graph_macs
    first = cfg.runtimes[0]
    parity_notes = {"inputs": r.images.label, "reference": "PyTorch pruned model", "graph": "portable fp32"}
    graph = onnx.load(str(r.artifact), load_external_data=False)
    warnings = list(r.warnings)
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
            "path": _plan_path(cfg, work, r.compensation),
        },
        "search": _search_section(r),
        "compensation": r.compensation,
        "recovery": r.recovery,
        "images": r.images.label,
        "accuracy": r.accuracy,
        "macs": {
            "dense": plan.dense_macs, "pruned": plan.pruned_macs, "ratio": plan.mac_ratio,
            "onnx_dense": onnx_dense, "onnx_pruned": onnx_pruned, "onnx_ratio": onnx_pruned / onnx_dense,
        },
        "params": {"dense": dense_params, "pruned": pruned_params, "ratio": pruned_params / dense_params},
        "blocks": block_rows(plan, loaded.geometry),
        "parity": {**asdict(r.parities[first]), **parity_notes},
        "runtimes": runtimes_report(r.parities, r.latencies, parity_notes),
        "artifact": {"target": cfg.target, "precision": cfg.precision, "quantize": cfg.quantize,
                     "quantize_mode": cfg.quantize_mode if cfg.quantize != "none" else None, "parity": r.artifact_parity},
        "latency": r.latencies.get(first, []),
        "machine": {**machine_info(cfg.runtimes), "threads": r.threads},
        "preprocessing": {k: loaded.data_config[k] for k in PREPROCESSING_KEYS if k in loaded.data_config},
        "onnx": {
            "path": str(out),
            "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "input": "input", "output": "output", "dynamic_batch": True,
            "ops": count_ops(r.artifact),
            "metadata": "metadata_props carry the preprocessing, model, budget and figures: prune-export info " + str(out),
        },
        "work": {"path": str(work), "bytes": folder_bytes(work), "kept": cfg.keep_work},
        "stage_seconds": r.stage_seconds,
        "wall_seconds": round(r.wall_seconds, 1),
    }
    for key in ("effort", "fidelity", "latency_model"):
        if getattr(r, key) is not None:
            report[key] = getattr(r, key)
    report |= r.extra
    if loaded.random_weights:
        report["warning"] = "random weights: accuracy figures mean nothing"
        warnings.insert(0, report["warning"])
    if warnings:
        report["warnings"] = warnings
    return report
