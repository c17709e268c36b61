"""Stage: surgery, compensation in closed form, then recovery by distillation (or their resumed results), reweights folded."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from exporter.compensation import CompensationConfig, compensate
from exporter.pruned_file import load_pruned
from exporter.recovery import RecoveryConfig, recover
from exporter.reweight import add_reweights, fold_reweights
from exporter.stages.cache import cached_file, is_fresh, key_of
from exporter.stages.config import RunConfig
from exporter.stages.images import Images
from exporter.stages.plan import sync, write_plan
from exporter.stages.workdir import resumed_note
from exporter.surgery import apply_plan
from search.core.atomic import atomic_path
from search.core.progress import progress_bar
from search.core.runtime import Runtime
from search.models.load import LoadedModel
from search.budget.plan import Plan

COMPENSATED_PLAN = "plan-compensated.json"
"""The plan as compensated, in the work folder: the searched plan's counts with the kept indices compensation chose."""


def recovery_config(cfg: RunConfig) -> RecoveryConfig:
    """The recovery settings of a resolved run: its steps and batch; held-out checks and checkpoints about
    ten times a run (at least every 20 steps), so a long run does not spend its time writing checkpoints."""
    every = max(RecoveryConfig.checkpoint_every, cfg.finetune_steps // 10)
    return RecoveryConfig(steps=cfg.finetune_steps, batch_size=cfg.batch_size, seed=cfg.seed, eval_every=every, checkpoint_every=every)


def _resumed_weights(work: Path, name: str, key: str, pruned: torch.nn.Module) -> dict[str, Any] | None:
    """Load the weights and summary a previous run saved as ``name`` for ``key`` into ``pruned``; None when there are none."""
    if not is_fresh(work, name, key):
        return None
    saved = torch.load(work / name, map_location="cpu", weights_only=True)
    pruned.load_state_dict(saved["model"])
    return json.loads(saved["summary"])


def _save_weights(work: Path, name: str, key: str, pruned: torch.nn.Module, summary: dict[str, Any], rt: Runtime) -> None:
    """Save ``pruned``'s weights and ``summary`` as stage ``name`` (rank 0, atomically), then wait for every rank."""
    if rt.is_main:
        def save(p: Path) -> None:
            with atomic_path(p) as tmp:
                torch.save({"model": pruned.state_dict(), "summary": json.dumps(summary)}, tmp)

        cached_file(work, name, key, save)
    sync(rt)


def compensation_config(cfg: RunConfig) -> CompensationConfig:
    """The compensation settings of a resolved run: its calibration images come from the search pool."""
    return CompensationConfig(images=min(CompensationConfig.images, cfg.search_images or CompensationConfig.images))


def compensation_stage(cfg: RunConfig, loaded: LoadedModel, plan: Plan, pruned: torch.nn.Module, images: Images, rt: Runtime,
                       weights_key: dict, notes: list[str]) -> tuple[dict[str, Any], Plan]:
    """Compensate ``pruned`` in place (``exporter.compensation``), or load the compensated weights a previous run saved.

    Returns the report's section and the plan as compensated (its kept indices re-chosen, its counts the
    same), which is also saved as ``plan-compensated.json`` in the work folder.
    """
    work, config = cfg.work_dir, compensation_config(cfg)
    key = key_of(**weights_key, plan=plan.to_json(), compensation=asdict(config), data=str(cfg.data), images=[cfg.search_images, cfg.heldout_images])
    resumed = _resumed_weights(work, "compensated.pt", key, pruned)
    if resumed is not None:
        notes.append(f"resumed the compensated weights {work / 'compensated.pt'}")
        return resumed, Plan.from_dict(resumed.pop("plan"))
    with progress_bar("compensation", len(plan.blocks), enabled=rt.is_main) as advance:
        result = compensate(loaded.model, pruned, plan, images.pool, config, rt, advance)
    final = result.plan or plan
    summary = result.to_dict()
    if rt.is_main:
        cached_file(work, COMPENSATED_PLAN, key, lambda p: write_plan(final, p))
    _save_weights(work, "compensated.pt", key, pruned, {**summary, "plan": final.to_dict()}, rt)
    notes.append(f"compensation: {result.describe()}")
    return summary, final


def recovery_stage(
    cfg: RunConfig, loaded: LoadedModel, plan: Plan, images: Images, rt: Runtime, weights_key: dict, notes: list[str]
) -> tuple[torch.nn.Module, dict[str, Any] | None, dict[str, Any] | None, Plan]:
    """The pruned model as it is exported: cut, compensated (``cfg.compensate``), recovered; with both summaries
    and the plan it keeps (compensation may re-choose the kept indices, never their counts). With
    ``cfg.pruned_weights`` it is that file's model, as it is."""
    if cfg.pruned_weights is not None:
        notes.append(f"the pruned model of {cfg.pruned_weights}, as it is: no compensation, no recovery")
        return load_pruned(cfg.pruned_weights), None, None, plan
    pruned = apply_plan(loaded.model, plan, loaded.geometry)
    if plan.removes_nothing:
        notes.append("the plan removes nothing: no recovery, no compensation")
        return pruned, None, None, plan
    compensation = None
    if cfg.compensate and not loaded.random_weights:
        compensation, plan = compensation_stage(cfg, loaded, plan, pruned, images, rt, weights_key, notes)
    if cfg.finetune_steps == 0:
        notes.append("no recovery (--finetune-steps 0)")
        return pruned, None, compensation, plan
    work = cfg.work_dir
    recovery = recovery_config(cfg)
    key = key_of(**weights_key, plan=plan.to_json(), recovery=asdict(recovery), reweight=cfg.reweight, data=str(cfg.data),
                 images=[cfg.search_images, cfg.heldout_images], compensation=compensation and asdict(compensation_config(cfg)))
    resumed_summary = _resumed_weights(work, "recovered.pt", key, pruned)
    if resumed_summary is not None:
        notes.append(f"resumed the recovered weights {work / 'recovered.pt'}")
        return pruned.eval(), resumed_summary, compensation, plan
    if cfg.reweight:
        add_reweights(pruned)
    state_path = work / f"recovery-{key}.pt"
    resumed = resumed_note(state_path, recovery.steps) if rt.is_main else None
    if resumed:
        notes.append(resumed)
    result = recover(pruned, loaded.model, images.pool, images.held_out, recovery, loaded.is_classifier, rt, state_path)
    fold_reweights(pruned)
    pruned.eval()
    summary = {**asdict(result), "steps": recovery.steps, "lr": recovery.lr, "batch_size": recovery.batch_size, "reweight": cfg.reweight}
    _save_weights(work, "recovered.pt", key, pruned, summary, rt)
    notes.append(f"{result.metric}: {result.history[0][1]:.4f} → best {result.best_value:.4f} at step {result.best_step}")
    return pruned, summary, compensation, plan
