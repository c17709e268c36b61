"""Stage: the Plan, searched by the chosen method, replayed from --plan, or resumed from the work directory.

A head-pruning method first chooses the heads (K from --heads, or from the budget), then, if it
also cuts channels (dsp+acp), scores the channels of the kept heads; the solver meets the one
budget either way. The budget is a share of a cost model's dense cost (``search.budget.cost``): MACs, or
the latency the target's table predicts. A correction round (``exporter.stages.latency``) gives
the solver a budget of its own and keeps the search's, so the finished search state is reused.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from exporter.stages.cache import cached_file, is_fresh, key_of
from exporter.stages.config import RunConfig
from exporter.stages.images import Images
from exporter.stages.workdir import resumed_note
from search.budget.allocate import SolverConfig, head_plan, make_plan
from search.core.atomic import atomic_path
from search.core.runtime import Runtime
from search.budget.cost import MACS, CostModel
from search.methods.heads import HeadTarget, check_total, heads_for_budget, total_heads
from search.budget.macs import ModelGeometry
from search.methods.registry import METHODS, SEARCHES_CHANNELS, SearchInputs, head_budget
from search.models.load import LoadedModel
from search.budget.plan import Plan


def sync(rt: Runtime) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if rt.distributed:
        torch.distributed.barrier()


def head_target(cfg: RunConfig, geometry: ModelGeometry, cost: CostModel = MACS) -> HeadTarget | None:
    """K and the scope of a head-pruning method (None for the others).

    K is ``--heads``, or the largest K whose head-only model fits the budget: the whole budget for a
    heads-only method, the head share of it for dsp+acp (``search.methods.registry.head_budget``).
    Raises OptionError or BudgetError (one line) when K is out of range or the budget out of reach.
    """
    if cfg.method is None or not METHODS[cfg.method].prunes_heads:
        return None
    if cfg.heads is not None:
        check_total(geometry, cfg.heads)
        return HeadTarget(cfg.heads, cfg.scope, "--heads")
    whole = cfg.solver_budget or cfg.budget
    budget = head_budget(cfg.method, whole, cfg.share)
    what = "budget" if cost.name == "macs" else "latency budget"
    source = f"{what} {whole:g}" if budget == whole else \
        f"head budget {budget:.4g} = 1 - {cfg.share:g} x (1 - {what} {whole:g})"
    return HeadTarget(heads_for_budget(geometry, budget, cfg.scope, cost), cfg.scope, source)


def removes_nothing(cfg: RunConfig, geometry: ModelGeometry) -> bool:
    """True when the run is an export of the dense model: budget 1, no --plan, and every head kept.

    Such a run has nothing to search for and nothing to recover, so it does neither.
    """
    if cfg.plan is not None or cfg.budget < 1.0:
        return False
    target = head_target(cfg, geometry)
    return target is None or target.total == total_heads(geometry)


def search(cfg: RunConfig, loaded: LoadedModel, images: Images, rt: Runtime, state_path: Path, cost: CostModel = MACS) -> Plan:
    geometry = loaded.geometry
    acp = cfg.acp_config()
    method = METHODS[cfg.method]
    inputs = SearchInputs(loaded.model, geometry, images.pool, loaded.is_classifier, acp, rt, state_path,
                          heads=head_target(cfg, geometry, cost), dsp=cfg.dsp_config(), cost=cost)
    naming = dict(model=loaded.timm_name, img_size=loaded.img_size, method=cfg.method)
    budget = cfg.solver_budget or cfg.budget
    if method.heads is not None:
        inputs = replace(inputs, kept=method.heads(inputs))
    if method.score is None:
        assert inputs.kept is not None, "a method without channel scores keeps heads"
        return head_plan(geometry, inputs.kept, budget, align=cfg.align, cost=cost, **naming)
    choice = method.score(inputs)
    solver = SolverConfig(budget, cfg.align, cfg.per_head_indices, normalise=method.normalise)
    targets = choice.widths if acp.widths == "search" else None
    return make_plan(geometry, choice.scores, solver, heads=inputs.kept, targets=targets, cost=cost, **naming)


def write_plan(plan: Plan, path: Path) -> None:
    """Save ``plan`` as JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(plan.to_json() + "\n")


def plan_stage(cfg: RunConfig, loaded: LoadedModel, images: Images, rt: Runtime, weights_key: dict, notes: list[str],
               cost: CostModel = MACS) -> Plan:
    geometry = loaded.geometry
    if cfg.plan is not None:
        plan = Plan.load(cfg.plan)
        plan.check(geometry, loaded.timm_name)
        notes.append(f"replayed {cfg.plan}")
        return plan
    if removes_nothing(cfg, geometry):
        notes.append("budget 1 removes nothing: no search")
        return Plan.dense(loaded.timm_name, loaded.img_size, geometry)
    work = cfg.work_dir
    search_fields = dict(
        **weights_key, method=cfg.method, budget=cfg.budget, align=cfg.align, per_head=cfg.per_head_indices,
        seed=cfg.seed, data=str(cfg.data), images=[cfg.search_images, cfg.heldout_images],
        acp=repr(cfg.acp_config()) if cfg.method in SEARCHES_CHANNELS else None,
        heads=[cfg.heads, cfg.scope, cfg.share] if METHODS[cfg.method].prunes_heads else None,
        dsp=repr(cfg.dsp_config()) if cfg.method.startswith("dsp") else None,
    )
    if cost.name != "macs":  # a MAC run keeps the keys it always had, so its work folder stays valid
        search_fields["cost"] = getattr(cost, "key", cost.name)
    search_key = key_of(**search_fields)
    key = search_key if cfg.solver_budget is None else key_of(search=search_key, solver_budget=cfg.solver_budget)
    path = work / "plan.json"
    fresh = is_fresh(work, "plan.json", key)
    sync(rt)  # every rank looks before rank 0 writes: magnitude and random scoring have no collective to wait on
    if fresh:
        notes.append(f"resumed the saved plan {path} (delete it to search anew)")
        return Plan.load(path)
    state_path = work / f"search-{search_key}.pt"
    partial = (state_path.with_name(f"{state_path.stem}-heads.pt"), state_path)  # dsp's heads stage, then the channels
    resumed = [note for note in (resumed_note(p, cfg.search_steps) for p in partial) if note] if rt.is_main else []
    plan = search(cfg, loaded, images, rt, state_path, cost)
    notes.extend(resumed)
    if rt.is_main:
        cached_file(work, "plan.json", key, lambda p: write_plan(plan, p))
    sync(rt)
    notes.append(f"searched ({cfg.method}), saved {path}")
    return plan
