"""The skeleton of every training loop here: the gate searches (acp, DSP) and the recovery fine-tune.

What the loops share is held once, here: resuming from a state file, the global batch of each step
drawn by (seed, step) (:func:`batch_indices`) so that every rank draws the same batch and takes its
own shard and a resumed run follows the uninterrupted trajectory, a checkpoint written by rank 0
every ``checkpoint_every`` steps and after the last, the barrier between ranks, the progress bar and
the per-step callback. What differs is passed in: the step itself (what is trained, its loss, its
learning rates, any evaluation) and what the state file holds besides the step.

The shape of a loop::

    start = resume(state_path, runtime, restore)      # 0, or the saved step after restore(state)
    ...                                               # whatever needs ``start`` (teacher targets)
    run_steps(loop, len(pool), pool.device, runtime, start, step, snapshot, state_path, on_step)

``step(i, idx)`` trains step ``i`` on the pool rows ``idx`` (this rank's shard of the global batch)
and returns what the progress bar shows; ``snapshot()`` is what the state file holds besides
``"step"``; :class:`BestState` keeps the best state for loops that select by a held-out metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from search.core.atomic import atomic_path
from search.core.progress import progress_bar
from search.core.runtime import Runtime


def batch_indices(pool_size: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of ``step``: the same on every rank and in every resumed run."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(pool_size, (batch_size,), generator=gen)


@dataclass(frozen=True)
class LoopConfig:
    """The schedule of one training loop.

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


Step = Callable[[int, torch.Tensor], str]
"""(step, this rank's batch: indices into the pool, on the pool's device) → what the progress bar shows.

Trains one step (forward, backward, optimiser) and anything the loop does after it (an evaluation)."""

Snapshot = Callable[[], dict[str, Any]]
"""What the state file holds besides ``"step"`` (model or gates, optimiser, anything the loop keeps)."""


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no gradient: the teacher of a distillation loop, or the model under the gates."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def parallel(module: nn.Module, runtime: Runtime) -> nn.Module:
    """``module`` wrapped for DistributedDataParallel when the runtime has ranks, as is otherwise."""
    return DistributedDataParallel(module) if runtime.distributed else module


def optimise(optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss`` (gradients cleared first)."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def resume(state_path: Path | None, runtime: Runtime, restore: Callable[[dict[str, Any]], None]) -> int:
    """The step to start from: 0 without a state file, else its ``"step"`` once ``restore`` has loaded the rest."""
    if state_path is None or not state_path.is_file():
        return 0
    state = torch.load(state_path, map_location=runtime.device, weights_only=True)
    restore(state)
    return int(state["step"])


def run_steps(
    loop: LoopConfig,
    pool_size: int,
    device: torch.device,
    runtime: Runtime,
    start: int,
    step: Step,
    snapshot: Snapshot,
    state_path: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Run steps ``start`` to ``loop.steps`` of a loop (see the module docstring).

    Args:
        loop: the schedule.
        pool_size: how many images the batches are drawn from.
        device: where the batch indices go (the pool's device).
        runtime: ranks (shard, barrier, which rank writes and shows progress).
        start: the first step to run (:func:`resume`).
        step: trains one step.
        snapshot: the state to checkpoint besides the step; rank 0 writes it atomically.
        state_path: where to checkpoint; None disables checkpoints.
        on_step: called with the number of finished steps after each step (progress reporting, tests).
    """
    with progress_bar(loop.name, total=loop.steps, completed=start, enabled=runtime.is_main) as advance:
        for index in range(start, loop.steps):
            idx = runtime.shard(batch_indices(pool_size, loop.batch_size, loop.seed, index)).to(device)
            label = step(index, idx)
            done = index + 1
            if state_path is not None and runtime.is_main and (done % loop.checkpoint_every == 0 or done == loop.steps):
                with atomic_path(state_path) as tmp:
                    torch.save({"step": done, **snapshot()}, tmp)
            if runtime.distributed:
                torch.distributed.barrier()
            advance(label)
            if on_step is not None:
                on_step(done)


class BestState:
    """The best state of a module by a held-out metric (higher is better): its step, value and a copy of its weights.

    Args:
        module: whose state is kept.
        step: the step of its current state.
        value: the metric of its current state.
    """

    def __init__(self, module: nn.Module, step: int, value: float) -> None:
        self.step, self.value, self.state = step, value, _copy(module)

    def offer(self, module: nn.Module, step: int, value: float) -> None:
        """Keep ``module``'s state if ``value`` beats the best so far (a tie keeps the earlier state)."""
        if value > self.value:
            self.step, self.value, self.state = step, value, _copy(module)

    def restore(self, module: nn.Module) -> None:
        """Load the best state into ``module``."""
        module.load_state_dict(self.state)


def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
