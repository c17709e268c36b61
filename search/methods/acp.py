"""Automatic channel pruning for multi-head attention (Lee & Hwang, 2024): the ``acp`` method.

1. Capture activations on a calibration batch; compute similarity weights and, unless turned off,
   the attention-difference initial logits (``search.methods.similarity``, ``search.methods.acp_init``).
2. Train the indicators (``search.methods.gates``) with the dense weights frozen: the gated model is
   distilled from the dense one while a differentiable expected-cost term (MACs, or the latency a
   measured table predicts on the target: ``search.budget.cost``) pushes the soft widths down to the budget; the soft width of every group is where its gates settle. A
   polarisation term g(1-g), ramped up over the run, drives each gate to 0 or 1: without it the
   soft widths meet the budget by sliding every gate down together, and the hard cut at the end
   is a different model from the one the search optimised.
3. Rank channels by similarity weight × indicator; ``search.budget.allocate`` turns the ranking into an
   aligned Plan with MACs ≤ budget × dense exactly. The widths of that plan are either the soft
   widths the search converged to, rounded to the alignment under the budget (``widths="search"``),
   or re-derived greedily from the ranking (``widths="greedy"``); both are returned.

The attention indicators are ``shared`` (one logit per channel index, the same in every head, so the
soft model has the equal-removal structure of the cut) or ``free`` (one per head and channel, equal
removal imposed only when the plan is cut); see ``search.methods.gates``.

With heads chosen first (``--method dsp+acp``), the search runs on the kept heads only: the
activations are captured with the removed heads masked out, the removed heads' gates stay at 0, and
the expected MACs count the kept heads (``search.methods.gates``).

The loop (``search.methods.gate_loop``, shared with DSP) checkpoints its state every ``checkpoint_every``
steps, and a re-run with the same inputs resumes from the last checkpoint. Batches are drawn from
a generator seeded by (seed, step), so a resumed run follows the same trajectory as an
uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from search.methods.activations import capture
from search.methods.acp_init import init_logits
from search.methods.distill import distill_step_loss
from search.methods.gate_loop import LoopConfig, train_gates
from search.methods.gate_optim import SharedScaleAdam
from search.methods.gates import ChannelGates, head_gated
from search.methods.importance import BlockScores
from search.core.choices import DEFAULT_INDICATOR, DEFAULT_OPTIMISER, DEFAULT_WIDTHS, INDICATORS, OPTIMISERS, WIDTHS, check_choice
from search.budget.cost import MACS, CostModel
from search.budget.macs import ModelGeometry
from search.cut.blocks import BlockWidths, KeptHeads
from search.core.runtime import Runtime, on_device
from search.methods.similarity import similarity_weights


@dataclass(frozen=True)
class AcpConfig:
    """Settings of the indicator search.

    Attributes:
        budget: fraction of the dense cost to keep (MACs, or latency under a table).
        steps: optimisation steps of the indicators.
        batch_size: global batch per step (split over ranks under torchrun).
        lr: Adam learning rate on the gate logits.
        budget_weight: weight of the expected-MACs excess in the loss.
        polarize: final weight of the g(1-g) term (linearly ramped from 0).
        similarity: use similarity-based weights in the ranking.
        attn_init: initialise indicators from attention differences (else a constant).
        indicator: ``shared`` (one q/k and v logit per channel index for all heads) or ``free``
            (one per head and channel).
        widths: ``search`` (the plan's widths are the soft widths the search converged to, rounded
            under the budget) or ``greedy`` (re-derived from the ranking by the budget solver).
        optimiser: ``shared-scale`` (``search.methods.gate_optim``: steps in proportion to the gradients) or
            ``adam`` (per-logit scale; every gate of steady gradient sign moves alike).
        calib_images: images used for similarity weights and the initialisation.
        checkpoint_every: steps between checkpoints.
        seed: seeds batch sampling.
    """

    budget: float
    steps: int = 40
    batch_size: int = 16
    lr: float = 0.1
    budget_weight: float = 5.0
    polarize: float = 1.0
    similarity: bool = True
    attn_init: bool = True
    indicator: str = DEFAULT_INDICATOR
    widths: str = DEFAULT_WIDTHS
    optimiser: str = DEFAULT_OPTIMISER
    calib_images: int = 8
    checkpoint_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("--indicator", self.indicator, INDICATORS)
        check_choice("--gate-optimiser", self.optimiser, OPTIMISERS)
        check_choice("--widths", self.widths, WIDTHS)


@dataclass(frozen=True)
class AcpResult:
    """What the search found.

    Attributes:
        indicators: final gate values per block, in (0, 1).
        initial: gate values per block before the first step.
        weights: similarity weights per block (None when turned off).
        widths: the soft widths the gates converged to (floats; per kept head for q/k and v).
        expected_ratio: expected cost at those widths / dense cost (MACs or latency).
    """

    indicators: tuple[BlockScores, ...]
    initial: tuple[BlockScores, ...]
    weights: tuple[BlockScores, ...] | None
    widths: tuple[BlockWidths, ...]
    expected_ratio: float

    @property
    def scores(self) -> tuple[BlockScores, ...]:
        """The final ranking: similarity weight × indicator (the indicator alone without weights)."""
        if self.weights is None:
            return self.indicators
        return tuple(BlockScores(qk=w.qk * s.qk, v=w.v * s.v, mlp=w.mlp * s.mlp) for w, s in zip(self.weights, self.indicators))


def done_fraction(step: int, steps: int) -> float:
    return (step + 1) / steps


def polarisation(gates: ChannelGates) -> torch.Tensor:
    """Mean of 4·g(1-g) over each group's gates of the kept heads, averaged over groups: 0 when every gate is 0 or 1."""
    terms = []
    for i in range(len(gates.qk)):
        block, heads = gates.values(i), gates.kept_heads[i]
        for g in (block.qk, block.v):
            if heads == g.shape[0]:
                terms.append((4 * g * (1 - g)).mean())
            elif heads:  # removed heads' gates are 0 and add nothing; average over the kept ones only
                terms.append((4 * g * (1 - g)).sum() / (heads * g.shape[1]))
        terms.append((4 * block.mlp * (1 - block.mlp)).mean())
    return torch.stack(terms).mean()


def _initial_scores(model: nn.Module, geometry: ModelGeometry, images: torch.Tensor, config: AcpConfig,
                    heads: KeptHeads | None = None):
    """Similarity weights and initial logits, from the activations of the model with only the kept heads."""
    if heads is None:
        acts = capture(model, geometry, images[: config.calib_images])
    else:
        masks = [torch.zeros(g.attention.num_heads, device=images.device) for g in geometry.blocks]
        for mask, kept in zip(masks, heads):
            mask[list(kept)] = 1.0
        with head_gated(model, geometry, masks.__getitem__):
            acts = capture(model, geometry, images[: config.calib_images])
    weights = tuple(similarity_weights(a) for a in acts) if config.similarity else None
    logits = init_logits(model, acts) if config.attn_init else None
    return weights, logits


def acp_search(
    model: nn.Module,
    geometry: ModelGeometry,
    images: torch.Tensor,
    config: AcpConfig,
    classifier: bool,
    runtime: Runtime,
    state_path: Path | None = None,
    on_step: Callable[[int], None] | None = None,
    heads: KeptHeads | None = None,
    cost: CostModel = MACS,
) -> AcpResult:
    """Search the indicators; the result holds the ranking (weight × indicator) and the soft widths.

    Args:
        model: the dense model; it is not modified.
        geometry: its geometry.
        images: the pool of preprocessed images the batches are drawn from.
        config: search settings.
        classifier: distil logits (True) or token features (False).
        runtime: device and process group.
        state_path: where to checkpoint and resume; None disables both.
        on_step: called after every finished step (progress reporting, tests).
        heads: the heads each block keeps, when they were chosen first (all when None); the search
            prunes channels of those heads only.
        cost: what the budget term prices (MACs by default).
    """
    with on_device(runtime, model):
        return _search_loop(model, geometry, images, config, classifier, runtime, state_path, on_step, heads, cost)


def _search_loop(
    model: nn.Module,
    geometry: ModelGeometry,
    images: torch.Tensor,
    config: AcpConfig,
    classifier: bool,
    runtime: Runtime,
    state_path: Path | None,
    on_step: Callable[[int], None] | None,
    heads: KeptHeads | None = None,
    cost: CostModel = MACS,
) -> AcpResult:
    """The indicator training on ``runtime.device``; the result is on the CPU."""
    model.eval()  # before the calibration capture, as in the loop
    pool = images.to(runtime.device)
    weights, logits = _initial_scores(model, geometry, pool, config, heads)
    gates = ChannelGates(geometry, init=logits, heads=heads, shared=config.indicator == "shared").to(runtime.device)
    initial = gates.scores()
    optimiser = SharedScaleAdam(gates.parameters(), lr=config.lr) if config.optimiser == "shared-scale" else \
        torch.optim.Adam(gates.parameters(), lr=config.lr)
    dense = float(cost.total(geometry))
    shown = "MACs" if cost.name == "macs" else "latency"

    def step_loss(step: int, batch: torch.Tensor, student: nn.Module, target: torch.Tensor | None) -> tuple[torch.Tensor, str]:
        kd = distill_step_loss(model, student, batch, classifier, runtime, target)
        ratio = gates.expected_cost(cost) / dense
        ramp = config.polarize * done_fraction(step, config.steps)
        loss = kd + config.budget_weight * torch.relu(ratio - config.budget) + ramp * polarisation(gates)
        return loss, f"kd {kd.item():.4f}  E[{shown}] {ratio.item():.3f}"

    loop = LoopConfig("acp search", config.steps, config.batch_size, config.seed, config.checkpoint_every)
    train_gates(model, gates, optimiser, pool, loop, classifier, runtime, step_loss, state_path, on_step)
    if weights is not None:
        weights = tuple(BlockScores(qk=w.qk.cpu(), v=w.v.cpu(), mlp=w.mlp.cpu()) for w in weights)
    with torch.no_grad():
        ratio = float(gates.expected_cost(cost) / dense)
    return AcpResult(indicators=gates.scores(), initial=initial, weights=weights, widths=gates.soft_widths(), expected_ratio=ratio)
