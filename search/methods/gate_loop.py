"""The gate searches' loop: gates over a frozen model, distilled from that model.

acp (channel indicators) and DSP (head logits) differ only in their gates and in what they add to
the distillation loss. The loop's skeleton (batches by (seed, step), sharding over ranks,
checkpoint and resume, the barrier, the progress bar) is :mod:`search.train_loop`, which the
recovery runs too; what is the searches' own is here: the frozen model as the teacher, its targets
computed once, the gated student, and a state file holding the gates and the optimiser.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from search.core.runtime import Runtime
from search.methods.distill import DistillStudent, teacher_targets
from search.methods.train_loop import LoopConfig, batch_indices, freeze, optimise, parallel, resume, run_steps

__all__ = ["LoopConfig", "StepLoss", "batch_indices", "train_gates"]

StepLoss = Callable[[int, torch.Tensor, nn.Module, torch.Tensor | None], tuple[torch.Tensor, str]]
"""(step, this rank's batch, the student, the teacher's targets for the batch or None) → (loss to minimise,
what the progress bar shows)."""


def train_gates(
    model: nn.Module,
    gates: nn.Module,
    optimiser: torch.optim.Optimizer,
    pool: torch.Tensor,
    loop: LoopConfig,
    classifier: bool,
    runtime: Runtime,
    step_loss: StepLoss,
    state_path: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Train ``gates`` (a :class:`search.methods.gates.Gates` module) over the frozen ``model``, in place.

    Args:
        model: the dense model, on ``runtime.device``; frozen here.
        gates: the trainable gates; the student is ``model`` gated by them.
        optimiser: over ``gates``' parameters.
        pool: the images batches are drawn from, on ``runtime.device``.
        loop: the schedule.
        classifier: distil logits (True) or token features (False).
        runtime: device and process group.
        step_loss: the loss of one step (the search's distillation loss and its own terms).
        state_path: where to checkpoint (the step, the gates, the optimiser) and resume; None disables both.
        on_step: called after every finished step (progress reporting, tests).

    The frozen model is the teacher; its targets for the whole pool are computed once when they fit
    in memory (``search.methods.distill.teacher_targets``) and handed to ``step_loss`` with each batch.
    """
    freeze(model)

    def restore(state: dict[str, Any]) -> None:
        gates.load_state_dict(state["gates"])
        optimiser.load_state_dict(state["optimiser"])

    start = resume(state_path, runtime, restore)
    targets = teacher_targets(model, pool, classifier, runtime) if start < loop.steps else None
    student = parallel(DistillStudent(model, classifier, gates), runtime)

    def step(index: int, idx: torch.Tensor) -> str:
        loss, label = step_loss(index, pool[idx], student, None if targets is None else targets[idx])
        optimise(optimiser, loss)
        return label

    def snapshot() -> dict[str, Any]:
        return {"gates": gates.state_dict(), "optimiser": optimiser.state_dict()}

    run_steps(loop, len(pool), pool.device, runtime, start, step, snapshot, state_path, on_step)
