"""Stage: the latency model of a run's target, and after export, its prediction against a measurement.

With ``--latency-budget`` (or ``--target-runtime`` named with a MAC budget) the run first gets the
target's latency table (``exporter.latency_model``; cached on disk), which prices the search and the
solver (``search.budget.cost``) and sets ``--align auto``. After export the pruned graph is timed against
the dense one on the target, in one interleaved run, and the report's ``latency_model`` section
puts the measured ratio beside the predicted one. If the measured ratio misses the latency budget
by more than the run-to-run noise, the run re-plans once with the solver's budget scaled by the
measured error (:func:`corrected_budget`); a miss that remains is stated in the report.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from exporter.timing import interleave, measure_latency, median_noise
from exporter.latency_model import latency_table
from exporter.latency_targets import DEFAULT_TARGET, LatencyTarget, check_target_name, resolve_target
from exporter.stages.config import RunConfig
from search.budget.allocate import min_widths
from search.core.errors import BudgetError, OptionError
from search.budget.cost import MACS, CostModel, cost_ratio
from search.budget.latency_table import LatencyTable
from search.budget.macs import ModelGeometry
from search.methods.registry import METHODS
from search.models.load import LoadedModel
from search.budget.plan import Plan

StagePrinter = Callable[[str], ContextManager[list[str]]]
FALLBACK_ALIGN = 8
"""``--align auto`` without a latency table (a MAC budget and no target named)."""
CHECK_TOLERANCE = 0.03
"""How far the table's held-out check may miss before a latency-budget run warns (the accuracy a latency budget promises)."""
MIN_MISS = 0.005
"""A measured ratio this close to the budget is within any noise estimate a short run gives."""


def check_latency_options(cfg: RunConfig) -> None:
    """OptionError for latency options that contradict each other or the run (before any work)."""
    if cfg.latency_budget is not None and not 0.0 < cfg.latency_budget <= 1.0:
        raise BudgetError(f"--latency-budget must be in (0, 1], got {cfg.latency_budget:g}; it is the share of the "
                          "dense model's latency on the target to keep")
    if cfg.target_runtime is not None:
        check_target_name(cfg.target_runtime)
    if cfg.latency_batch < 1:
        raise OptionError(f"--latency-batch must be 1 or more, got {cfg.latency_batch}")
    if cfg.latency_budget is not None and cfg.quantize != "none":
        raise OptionError("--latency-budget times fp32 or fp16 blocks; an int8 table is not built yet: "
                          "use --budget with --quantize int8, or drop --quantize")
    if cfg.latency_budget is not None and cfg.plan is not None:
        raise OptionError("--plan fixes the budget; drop --latency-budget to replay it")
    if cfg.times_target:
        name = cfg.target_runtime or cfg.runtimes[0]
        if name in ("ort", "openvino"):
            from exporter.runtimes import get_runtime

            get_runtime(name)  # RuntimeUnavailableError, one line naming the extra, when it is not installed


def target_of(cfg: RunConfig, threads: int) -> LatencyTarget | None:
    """The run's latency target, or None when it builds no table."""
    if not cfg.times_target:
        return None
    from exporter.runtimes.ort import available_providers

    name = cfg.target_runtime or (cfg.runtimes[0] if cfg.runtimes else DEFAULT_TARGET)
    return resolve_target(name, cfg.precision, cfg.latency_batch, threads, cuda=torch.cuda.is_available(),
                          ort_cuda="CUDAExecutionProvider" in available_providers())


def cost_stage(cfg: RunConfig, loaded: LoadedModel, stage: StagePrinter, threads: int
               ) -> tuple[CostModel, LatencyTable | None, LatencyTarget | None, Path | None, bool]:
    """The cost model of the run (MACs, or the target's table) and the table, its file and whether it was reused."""
    target = target_of(cfg, threads)
    if target is None:
        return MACS, None, None, None, False
    with stage(f"latency table: {target.label}") as notes:
        if target.note:
            notes.append(target.note)
        table, path, reused = latency_table(loaded.model, loaded.timm_name, tuple(loaded.data_config["input_size"]),
                                            loaded.geometry, target)
        notes.append(f"{'reused' if reused else 'timed, cached in'} {path.name}; align {table.align}")
        halved = table.additivity.get("channels-halved")
        if halved:
            notes.append(f"check, channels halved: parts {halved['parts_ratio']:.3f} of dense, calibrated "
                         f"{halved['calibrated_ratio']:.3f}, measured {halved['measured_ratio']:.3f}")
    return (table if cfg.latency_budget is not None else MACS), table, target, path, reused


def table_check_warning(cfg: RunConfig, table: LatencyTable | None) -> str | None:
    """A warning when a latency budget is planned with a table that missed its own held-out check.

    The table is calibrated on whole models cut in one group at a time and checked on a model cut
    in every group (``channels-halved``), which the calibration never saw. Where that check misses
    by more than ``CHECK_TOLERANCE`` (small blocks, where call overhead and per-token work outweigh
    the widths the table varies), the table also misprices the shapes a search compares, so the
    plan it picks can be no faster than a MAC plan and keep less; the user should hear it before
    trusting the budget.
    """
    if cfg.latency_budget is None or table is None:
        return None
    check = table.additivity.get(table.additivity.get("checked_on", ""))
    if not isinstance(check, dict) or "calibrated_ratio" not in check:
        return None
    miss = check["calibrated_ratio"] - check["measured_ratio"]
    if abs(miss) <= CHECK_TOLERANCE:
        return None
    return (f"the latency table missed its own held-out check by {miss:+.3f} (a model with every channel halved: "
            f"predicted {check['calibrated_ratio']:.3f} of dense, measured {check['measured_ratio']:.3f}), so its prices "
            "of shapes are off by as much; the correction round re-plans against the measured latency, but at equal "
            "latency a --budget (MACs) plan may keep more accuracy on this model and target")


def resolve_align(cfg: RunConfig, table: LatencyTable | None, geometry: ModelGeometry | None = None,
                  cost: CostModel | None = None) -> int:
    """``--align``: the one given, else the table's (``--align auto``), else 8.

    With ``geometry`` and ``cost``, an automatic alignment is halved (not below 8) while the smallest
    model it allows would miss the budget: auto picks the fastest alignment the budget can reach.
    """
    if cfg.align is not None:
        return cfg.align
    if table is None:
        return FALLBACK_ALIGN
    align = table.align
    if geometry is not None and cost is not None and cfg.method is not None and not METHODS[cfg.method].prunes_heads:
        budget = cfg.solver_budget or cfg.budget
        while align > FALLBACK_ALIGN and float(cost.total(geometry, min_widths(geometry, align))) > budget * float(cost.total(geometry)):
            align //= 2
    return align


def cheapest_ratio(cfg: RunConfig, geometry: ModelGeometry, cost: CostModel) -> float:
    """The cost ratio of the smallest model at the run's alignment (0 for head methods, whose floor the head count sets)."""
    if cfg.method is None or METHODS[cfg.method].prunes_heads:
        return 0.0
    return float(cost.total(geometry, min_widths(geometry, cfg.align))) / float(cost.total(geometry))


def check_reachable(cfg: RunConfig, geometry: ModelGeometry, cost: CostModel, align: int) -> None:
    """BudgetError before the search when even the smallest aligned model misses a latency budget."""
    if cost.name == "macs" or cfg.method is None or METHODS[cfg.method].prunes_heads:
        return  # MAC budgets are checked by the solver as ever; head methods by the head count
    floor = float(cost.total(geometry, min_widths(geometry, align))) / float(cost.total(geometry))
    budget = cfg.solver_budget or cfg.budget
    if floor > budget:
        raise BudgetError(f"--latency-budget {budget:g} is unreachable: the smallest model with widths aligned to {align} "
                          f"takes {floor:.3f} of the dense {cost.label}; raise it, lower --align, or use "
                          "--method dsp+acp to remove heads as well")


def _paired_noise(dense: list[float], pruned: list[float]) -> float:
    """Run-to-run noise of a pruned/dense ratio: the larger of the median's notch over the per-round
    ratios and the difference between the first and the second half of the run.

    On a shared machine a neighbour's load comes in bursts of seconds to minutes, so rounds next to
    each other are alike and the spread within one run understates how much the next run differs;
    the halves of one run differ by about as much.
    """
    ratios = [p / d for p, d in zip(pruned, dense)]
    half = len(ratios) // 2
    drift = abs(statistics.median(ratios[:half]) - statistics.median(ratios[half:])) if half >= 2 else 0.0
    return max(median_noise(ratios), drift)


def measure_target(cfg: RunConfig, target: LatencyTarget, dense: tuple[Path, torch.nn.Module], pruned: tuple[Path, torch.nn.Module],
                   input_size: tuple[int, ...], latencies: dict[str, list[dict[str, Any]]], runs: int) -> dict[str, Any]:
    """Pruned against dense on the target, one interleaved run: ratio of medians, noise, and the medians.

    The graphs are the portable exports, like the table's parts (fp16-converted for an fp16 target).
    When the run's own latency stage already timed exactly that (same runtime on the CPU, batch,
    threads, portable fp32 artifact), its samples are used instead of timing again.
    """
    plain_artifact = cfg.target == "portable" and cfg.precision == "fp32" and cfg.quantize == "none"
    if target.device == "cpu" and target.runtime in latencies and plain_artifact:
        for entry in latencies[target.runtime]:
            if entry["batch"] == target.batch and entry["threads"] == target.threads and "CPU" in entry["provider"]:
                s = entry["samples_ms"]
                return {"measured_ratio": entry["ratio"], "noise": _paired_noise(list(s["dense"]), list(s["pruned"])),
                        "dense_ms": entry["median_ms"]["dense"], "pruned_ms": entry["median_ms"]["pruned"],
                        "runs": entry["runs"], "measured_by": "the run's latency stage"}
    return {**measure_pair(target, dense, pruned, input_size, max(runs, 10), cfg.seed), "measured_by": f"timed on {target.name}"}


def measure_pair(target: LatencyTarget, dense: tuple[Path | None, torch.nn.Module], pruned: tuple[Path | None, torch.nn.Module],
                 input_size: tuple[int, ...], runs: int, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Pruned against dense on ``target`` in one interleaved run: ratio of medians, its noise, the medians.

    PyTorch targets time the modules (CUDA graphs on CUDA); ONNX targets time the files (each pair
    holds a path and a module), converted to fp16 for an fp16 target.
    """
    if target.runtime == "torch":
        from exporter.torch_timing import torch_runner, torch_threads

        sample = torch.randn((target.batch, *input_size), generator=torch.Generator().manual_seed(seed))
        with torch_threads(target.threads):
            runners = {name: torch_runner(model, sample, target.device, target.precision, target.graphs)
                       for name, (_, model) in (("dense", dense), ("pruned", pruned))}
            samples = interleave(runners, runs, warmup=3, progress=progress, title=f"latency on {target.name}")
    else:
        paths = {"dense": dense[0], "pruned": pruned[0]}
        if any(p is None for p in paths.values()):
            raise ValueError(f"{target.name} times ONNX files: give the dense and pruned paths")
        if target.precision == "fp16":
            from exporter.quantize import convert_fp16

            paths = {name: convert_fp16(path, path.with_name(f"{path.stem}-target-fp16.onnx")) for name, path in paths.items()}
        result = measure_latency(paths, batch=target.batch, threads=target.threads, runs=runs, warmup=3,
                                 provider="CUDAExecutionProvider" if target.device == "cuda" else None,
                                 input_size=tuple(input_size), seed=seed, runtime=target.runtime, progress=progress)
        samples = {name: list(result.samples_ms[name]) for name in paths}
    medians = {name: statistics.median(s) for name, s in samples.items()}
    return {"measured_ratio": medians["pruned"] / medians["dense"], "noise": _paired_noise(samples["dense"], samples["pruned"]),
            "dense_ms": medians["dense"], "pruned_ms": medians["pruned"], "runs": runs}


def corrected_budget(budget: float, solved_for: float, predicted: float, measured: float, noise: float) -> float | None:
    """The solver budget of the correction round, or None when the measured ratio meets ``budget`` within noise.

    The table predicted ``predicted`` for a plan solved for ``solved_for`` and the target measured
    ``measured``: the error factor measured / predicted is assumed to hold for the next plan too,
    so the solver aims at ``budget`` × predicted / measured (never above what it aimed at before).
    """
    if measured - budget <= max(noise, MIN_MISS):
        return None
    return min(solved_for, budget * predicted / measured) * (1 - 1e-9)


def latency_model_section(cfg: RunConfig, plan: Plan, geometry: ModelGeometry, table: LatencyTable, target: LatencyTarget,
                          path: Path | None, reused: bool, measured: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``latency_model``: target, table, budget, predicted and measured ratio, additivity, correction."""
    predicted = cost_ratio(table, geometry, plan.widths())
    section: dict[str, Any] = {
        "target": table.target, "table": str(path) if path else None, "table_key": table.key, "table_reused": reused,
        "table_runs": table.runs, "align": table.align, "align_probe": table.align_probe,
        "cost": "latency" if cfg.latency_budget is not None else "macs",
        "budget": cfg.latency_budget, "solver_budget": cfg.solver_budget or cfg.latency_budget,
        "predicted_ratio": predicted, "additivity": table.additivity,
        "correction": cfg.latency_correction,
    }
    if measured is not None:
        section.update(measured)
        section["prediction_error"] = measured["measured_ratio"] - predicted
        budget = cfg.latency_budget
        if budget is not None and measured["measured_ratio"] - budget > max(measured["noise"], MIN_MISS):
            rounds = "after one correction round" if cfg.latency_correction else "and no correction round ran"
            section["miss"] = (f"measured ratio {measured['measured_ratio']:.3f} misses the latency budget {budget:g} "
                               f"by more than the run-to-run noise ({measured['noise']:.3f}) {rounds}")
    return section
