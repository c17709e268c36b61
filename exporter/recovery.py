"""Recovery: fine-tune the pruned model (and its reweights) by distillation from the dense model.

A falling distillation loss can hide a collapsing feature space (seen here: the cosine to the
teacher rose from 0.28 to 0.94 while k-NN fell from 57.5% to 47.6%), so the
loop watches a held-out metric, not the loss, and keeps the best state:
- backbones: relation agreement, the Pearson correlation between the student's and the teacher's
  sample-by-sample cosine-similarity matrices on the held-out images. k-NN depends on exactly
  that geometry; unlike a k-NN score on a few hundred images (a few points of noise per
  evaluation, too coarse to pick a checkpoint by) it is label-free and its n²/2 pairs make it steady;
- classifiers: the held-out distillation loss (negated, so higher is better).
The loop is :mod:`search.methods.train_loop`'s skeleton (the gate searches run it too): state is checkpointed
every ``checkpoint_every`` steps and a re-run resumes from it; batches are
drawn by (seed, step), so a resumed run follows the uninterrupted trajectory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from exporter.fidelity import relation_agreement
from exporter.reweight import HeadReweight, UnitScale
from search.core.runtime import Runtime, on_device
from search.methods.distill import DistillStudent, distill_loss, distill_step_loss, distill_targets, teacher_targets
from search.methods.train_loop import BestState, LoopConfig, freeze, optimise, parallel, resume, run_steps

RECOVERY_SEED_OFFSET = 7919
"""Added to the seed for recovery's batches, so that they are not the search's batches of the same seed."""


@dataclass(frozen=True)
class RecoveryConfig:
    """Settings of the recovery fine-tune.

    Attributes:
        steps: optimisation steps (0 skips recovery).
        batch_size: global batch per step.
        lr: peak AdamW learning rate of the weights.
        reweight_lr: peak learning rate of the reweight modules.
        warmup: fraction of the steps over which the learning rates rise linearly from 0; they then
            decay to 0 on a cosine. A pretrained ViT hit with the full rate at step 1 loses more
            than recovery gives back.
        weight_decay: AdamW weight decay (not applied to reweights).
        eval_every: steps between held-out evaluations.
        checkpoint_every: steps between checkpoints.
        seed: seeds batch sampling.
    """

    steps: int = 50
    batch_size: int = 16
    lr: float = 1e-4
    reweight_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    eval_every: int = 20
    checkpoint_every: int = 20
    seed: int = 0


@dataclass(frozen=True)
class HeldOut:
    """Held-out images and, when the data is labelled, their labels."""

    images: torch.Tensor
    labels: torch.Tensor | None


@dataclass(frozen=True)
class RecoveryResult:
    """What recovery did: the held-out metric over time and the step whose state was kept."""

    metric: str
    history: tuple[tuple[int, float], ...]
    best_step: int
    best_value: float


def _features(model: nn.Module, images: torch.Tensor, runtime: Runtime, classifier: bool) -> torch.Tensor:
    outs = []
    with torch.no_grad(), runtime.autocast():
        for chunk in images.split(32):
            out = model(chunk.to(runtime.device))
            outs.append(out.float().cpu())
    return torch.cat(outs)


class Evaluator:
    """The held-out selection metric, oriented so that higher is better.

    The teacher is frozen, so its held-out outputs are computed once here rather than at every
    evaluation: on a CPU that halves the cost of each evaluation.
    """

    def __init__(self, teacher: nn.Module, held_out: HeldOut, classifier: bool, runtime: Runtime) -> None:
        self.held_out, self.classifier, self.runtime = held_out, classifier, runtime
        self.metric = "neg_distill_loss" if classifier else "relation_agreement"
        teacher.eval()
        if classifier:
            with torch.no_grad(), runtime.autocast():
                self.reference = distill_targets(teacher, held_out.images.to(runtime.device), classifier)
        else:
            self.reference = _features(teacher, held_out.images, runtime, classifier)

    def __call__(self, model: nn.Module) -> float:
        model.eval()
        if not self.classifier:
            return relation_agreement(_features(model, self.held_out.images, self.runtime, self.classifier), self.reference)
        with torch.no_grad(), self.runtime.autocast():
            images = self.held_out.images.to(self.runtime.device)
            return -float(distill_loss(distill_targets(model, images, self.classifier), self.reference, self.classifier))


def lr_factor(step: int, config: RecoveryConfig) -> float:
    """Multiplier of the peak learning rates at ``step`` (0-based): linear warm-up, then cosine to 0.

    A pure function of the step, so a resumed run uses the same rates as an uninterrupted one.
    """
    warmup = max(1, round(config.warmup * config.steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))


def _param_groups(model: nn.Module, config: RecoveryConfig) -> list[dict]:
    reweights = [p for m in model.modules() if isinstance(m, (HeadReweight, UnitScale)) for p in m.parameters()]
    ids = {id(p) for p in reweights}
    weights = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": weights, "lr": config.lr, "peak_lr": config.lr, "weight_decay": config.weight_decay}]
    if reweights:
        groups.append({"params": reweights, "lr": config.reweight_lr, "peak_lr": config.reweight_lr, "weight_decay": 0.0})
    return groups


def recover(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    held_out: HeldOut,
    config: RecoveryConfig,
    classifier: bool,
    runtime: Runtime,
    state_path: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> RecoveryResult:
    """Distil ``teacher`` into ``student`` in place and leave the best held-out state loaded.

    Training runs on ``runtime.device``; both models are handed back on the CPU.
    """
    with on_device(runtime, student, teacher):
        return _recover(student, teacher, images, held_out, config, classifier, runtime, state_path, on_step)


def _recover(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    held_out: HeldOut,
    config: RecoveryConfig,
    classifier: bool,
    runtime: Runtime,
    state_path: Path | None,
    on_step: Callable[[int], None] | None,
) -> RecoveryResult:
    freeze(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(_param_groups(student, config))
    evaluate = Evaluator(teacher, held_out, classifier, runtime)
    metric, initial = evaluate.metric, evaluate(student)
    history: list[tuple[int, float]] = [(0, initial)]
    best = BestState(student, 0, initial)

    def restore(state: dict[str, Any]) -> None:
        student.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        best.step, best.value, best.state = int(state["best_step"]), float(state["best_value"]), state["best_model"]
        history[:] = [tuple(h) for h in state["history"]]

    start = resume(state_path, runtime, restore)
    images = images.to(runtime.device)
    targets = teacher_targets(teacher, images, classifier, runtime) if start < config.steps else None
    trained = parallel(DistillStudent(student, classifier), runtime)

    def step(index: int, idx: torch.Tensor) -> str:
        student.train()
        loss = distill_step_loss(teacher, trained, images[idx], classifier, runtime, None if targets is None else targets[idx])
        for group in optimiser.param_groups:
            group["lr"] = group["peak_lr"] * lr_factor(index, config)
        optimise(optimiser, loss)
        done = index + 1
        if done % config.eval_every == 0 or done == config.steps:
            value = evaluate(student)
            history.append((done, value))
            best.offer(student, done, value)
        return f"loss {loss.item():.4f}  {metric} best {best.value:.4f}@{best.step}"

    def snapshot() -> dict[str, Any]:
        return {"model": student.state_dict(), "optimiser": optimiser.state_dict(), "best_step": best.step,
                "best_value": best.value, "best_model": best.state, "history": history}

    loop = LoopConfig("recovery", config.steps, config.batch_size, config.seed + RECOVERY_SEED_OFFSET, config.checkpoint_every)
    run_steps(loop, len(images), images.device, runtime, start, step, snapshot, state_path, on_step)
    best.restore(student)
    student.eval()
    return RecoveryResult(metric=metric, history=tuple(history), best_step=best.step, best_value=best.value)
