"""Stage: surgery, then recovery by distillation (or its resumed result), reweights folded."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from exporter.recovery import RecoveryConfig, recover
from exporter.reweight import add_reweights, fold_reweights
from exporter.stages.cache import cached_file, is_fresh, key_of
from exporter.stages.config import RunConfig
from exporter.stages.images import Images
from exporter.stages.plan import sync
from exporter.stages.workdir import resumed_note
from exporter.surgery import apply_plan
from search.core.atomic import atomic_path
from search.core.runtime import Runtime
from search.models.load import LoadedModel
from search.budget.plan import Plan


def recovery_config(cfg: RunConfig) -> RecoveryConfig:
    """The recovery settings of a resolved run: its steps and batch; held-out checks and checkpoints about
    ten times a run (at least every 20 steps), so a long run does not spend its time writing checkpoints."""
    every = max(RecoveryConfig.checkpoint_every, cfg.finetune_steps // 10)
    return RecoveryConfig(steps=cfg.finetune_steps, batch_size=cfg.batch_size, seed=cfg.seed, eval_every=every, checkpoint_every=every)


def recovery_stage(
    cfg: RunConfig, loaded: LoadedModel, plan: Plan, images: Images, rt: Runtime, weights_key: dict, notes: list[str]
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    pruned = apply_plan(loaded.model, plan, loaded.geometry)
    if plan.removes_nothing:
        notes.append("the plan removes nothing: no recovery")
        return pruned, None
    if cfg.finetune_steps == 0:
        notes.append("no recovery (--finetune-steps 0)")
        return pruned, None
    work = cfg.work_dir
    recovery = recovery_config(cfg)
    key = key_of(**weights_key, plan=plan.to_json(), recovery=asdict(recovery), reweight=cfg.reweight, data=str(cfg.data),
               images=[cfg.search_images, cfg.heldout_images])
    path = work / "recovered.pt"
    if is_fresh(work, "recovered.pt", key):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        pruned.load_state_dict(saved["model"])
        notes.append(f"resumed the recovered weights {path}")
        return pruned.eval(), json.loads(saved["summary"])
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
    if rt.is_main:
        def save(p: Path) -> None:
            with atomic_path(p) as tmp:
                torch.save({"model": pruned.state_dict(), "summary": json.dumps(summary)}, tmp)

        cached_file(work, "recovered.pt", key, save)
    sync(rt)
    notes.append(f"{result.metric}: {result.history[0][1]:.4f} → best {result.best_value:.4f} at step {result.best_step}")
    return pruned, summary
