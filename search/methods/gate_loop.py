"""The training loop both searches share: gates over a frozen model, distilled from that model.

acp (channel indicators) and DSP (head logits) differ only in their gates and in what they add to
the distillation loss; batching, sharding over ranks, checkpoint and resume, the barrier and the
progress bar are the same, and live here once.

Batches are drawn by (seed, step) (``batch_indices``), so every rank draws the same global batch
and takes its own shard, and a resumed run follows the uninterrupted trajectory. The state (the
gates, the optimiser, the step) is checkpointed by rank 0 every ``checkpoint_every`` steps and at
the end; a re-run with a state file resumes from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from search.core.atomic import atomic_path
from search.core.progress import progress_bar
from search.core.runtime import Runtime
from search.methods.distill import DistillStudent, teacher_targets


def batch_indices(pool_size: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of ``step``: the same on every rank and in every resumed run."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(pool_size, (batch_size,), generator=gen)


@dataclass(frozen=True)
class LoopConfig:
    """The schedule of one gate search.

    Attributes:
        name: what the progress bar says.
        steps: optimisation steps.
        batch_size: global batch per step (split over ranks).
        seed: seeds batch sampling.
        checkpoint_every: steps between checkpoints.
    """

    name: str
    steps: int
    batch_size: int
    seed: int
    checkpoint_every: int


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
        state_path: where to checkpoint and resume; None disables both.
        on_step: called after every finished step (progress reporting, tests).

    The frozen model is the teacher; its targets for the whole pool are computed once when they fit
    in memory (``search.methods.distill.teacher_targets``) and handed to ``step_loss`` with each batch.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    start = 0
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location=runtime.device, weights_only=True)
        gates.load_state_dict(state["gates"])
        optimiser.load_state_dict(state["optimiser"])
        start = int(state["step"])
    targets = teacher_targets(model, pool, classifier, runtime) if start < loop.steps else None
    student: nn.Module = DistillStudent(model, classifier, gates)
    if runtime.distributed:
        student = DistributedDataParallel(student)
    with progress_bar(loop.name, total=loop.steps, completed=start, enabled=runtime.is_main) as advance:
        for step in range(start, loop.steps):
            idx = runtime.shard(batch_indices(len(pool), loop.batch_size, loop.seed, step)).to(pool.device)
            loss, label = step_loss(step, pool[idx], student, None if targets is None else targets[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            done = step + 1
            if state_path is not None and runtime.is_main and (done % loop.checkpoint_every == 0 or done == loop.steps):
                with atomic_path(state_path) as tmp:
                    torch.save({"step": done, "gates": gates.state_dict(), "optimiser": optimiser.state_dict()}, tmp)
            if runtime.distributed:
                torch.distributed.barrier()
            advance(label)
            if on_step is not None:
                on_step(done)
