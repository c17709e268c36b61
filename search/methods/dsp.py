"""Differentiable subset pruning of attention heads (Li, Cotterell & Sachan, TACL 2021): the ``dsp`` method.

One learnable logit w per head (per block, or one table over all heads of the model with the
global scope). At every step a Gumbel soft top-k turns the logits into a mask that keeps exactly k
heads in expectation, summing to k:

    r = w + Gumbel noise;  repeat k times: p = softmax(r / T), mask += p, r += log(max(1 − p, eps)).

The mask scales each head's output before the output projection (each attention kind's
``head_gate``; at 0 it acts like removing the head), and the masked model is distilled from the
dense one with only the logits trainable (Adam, lr 0.5 as in the paper). The temperature T falls
log-linearly from ``t0`` to ``tf`` over ``cooldown`` steps and is then held. A straight-through
variant (``straight_through``) runs the hard top-k of the soft mask forward and the soft mask's
gradient backward. The heads kept are the top-k of w in each scope (``search.methods.heads``).

Defaults, for searches of tens of steps rather than the paper's thousands (BERT: T0 1000, Tf 1e-8):
- ``t0 = 10``: with logits starting equal (0) and Gumbel noise of standard deviation 1.3, r/T is
  about 0.1, so the first masks are close to the uniform k/H: every head is partly on and gets a
  gradient. 1000 would spend most of a 40-step run on a mask indistinguishable from uniform.
- ``tf = 0.01``: a logit gap of 0.05 (a tenth of one Adam step at lr 0.5) becomes e⁵ in the
  softmax, so the final masks are hard: the model the search ends on is the one surgery cuts.
  1e-8 changes nothing more and would make the soft mask's gradients vanish sooner.
- ``cooldown`` = 3/4 of the steps: the last quarter trains on near-hard masks at tf.
- soft rather than straight-through by default: annealing already makes the late masks hard, and
  the soft masks of the early steps let the distillation loss see every head.

Batches and noise are drawn from generators seeded by (seed, step), so a resumed run (the loop
checkpoints every ``checkpoint_every`` steps) follows the uninterrupted trajectory, and every rank
under torchrun draws the same mask.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from search.core.choices import DSP_LR, DSP_T0, DSP_TF
from search.core.errors import OptionError
from search.core.runtime import Runtime, on_device
from search.methods.distill import distill_step_loss
from search.methods.gate_loop import LoopConfig, train_gates
from search.methods.gates import head_gated
from search.methods.heads import HeadTarget, layer_counts, top_heads, total_heads
from search.budget.macs import ModelGeometry
from search.cut.blocks import KeptHeads

EPS = float(torch.finfo(torch.float64).tiny)
"""Floor of 1 − p inside the log of the soft top-k: the smallest normal float64 (the paper's code, in float32, uses
float32's). Once a head's p rounds to 1 its r falls by −log(EPS) = 708; float32's 87 would let a head whose
logit leads by more than 87·T be taken twice at low temperatures, and its mask exceed 1 by a whole round."""

NOISE_STREAM = 500_009
"""Offset that keeps the Gumbel noise generator apart from the batch generator of the same step."""


@dataclass(frozen=True)
class DspConfig:
    """Settings of the DSP head search (every default is explained in the module docstring).

    Attributes:
        steps: optimisation steps of the head logits.
        batch_size: global batch per step (split over ranks under torchrun).
        lr: Adam learning rate on the head logits (the paper's 0.5).
        t0: temperature at step 0.
        tf: temperature reached after ``cooldown`` steps and held from then on.
        cooldown: steps of the log-linear descent from t0 to tf; None for 3/4 of ``steps``.
        straight_through: hard top-k forward, the soft mask's gradient backward.
        checkpoint_every: steps between checkpoints.
        seed: seeds the batches and the Gumbel noise.
    """

    steps: int = 40
    batch_size: int = 16
    lr: float = DSP_LR
    t0: float = DSP_T0
    tf: float = DSP_TF
    cooldown: int | None = None
    straight_through: bool = False
    checkpoint_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.t0 > 0 and self.tf > 0 and math.isfinite(self.t0) and math.isfinite(self.tf)):
            raise OptionError(f"DSP temperatures must be positive, got --dsp-t0 {self.t0:g} --dsp-tf {self.tf:g}")
        if self.tf > self.t0:
            raise OptionError(f"--dsp-tf {self.tf:g} is above --dsp-t0 {self.t0:g}; the temperature anneals downwards")
        if self.cooldown is not None and self.cooldown < 1:
            raise OptionError(f"--dsp-cooldown must be at least 1 step, got {self.cooldown}")
        if not self.lr > 0:
            raise OptionError(f"--dsp-lr must be positive, got {self.lr:g}")

    @property
    def cooldown_steps(self) -> int:
        """Steps from t0 to tf: ``cooldown``, or 3/4 of the steps (at least 1)."""
        return self.cooldown if self.cooldown is not None else max(1, round(0.75 * self.steps))

    def temperature(self, step: int) -> float:
        """The temperature of ``step``: see :func:`temperature`."""
        return temperature(step, self.t0, self.tf, self.cooldown_steps)

    def describe(self) -> str:
        """One line with every setting, printed when a run starts."""
        return (f"DSP {self.steps} steps, batch {self.batch_size}, Adam lr {self.lr:g} on the head logits, temperature "
                f"{self.t0:g} → {self.tf:g} log-linear over {self.cooldown_steps} steps then held, "
                f"{'straight-through' if self.straight_through else 'soft'} top-k")


def temperature(step: int, t0: float, tf: float, cooldown: int) -> float:
    """Log-linear annealing: log T falls linearly from log t0 at step 0 to log tf at ``cooldown``, then stays."""
    if step >= cooldown:
        return tf
    return t0 * (tf / t0) ** (step / cooldown)


def soft_topk(logits: torch.Tensor, k: int, temperature: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The Gumbel soft top-k mask over the last dimension: non-negative entries that sum to exactly ``k``.

    r = logits + noise; k times: p = softmax(r / T), mask += p, r += log(max(1 − p, eps)). Each
    round adds a distribution that sums to 1, and the update pushes the next round away from what
    this one took. The push is soft too: a head's weight shrinks by (1 − p)^(1/T), so a head that
    leads by far can be taken again in the next round and get more than 1 (logits 10:1 at T = 1, k = 2
    give 1.41 and 0.59), as in the paper. As T falls the mask becomes the hard top-k of r. Computed in
    float64 (a mask has a few hundred entries at most), returned in the logits' dtype.
    """
    r = logits.double() if noise is None else logits.double() + noise.double()
    mask = r * 0.0  # zeros that keep the logits in the graph, so k = 0 still gives them a (zero) gradient
    for _ in range(k):
        p = torch.softmax(r / temperature, dim=-1)
        mask = mask + p
        r = r + torch.log(torch.clamp(1.0 - p, min=EPS))
    return mask.to(logits.dtype)


def hard_topk(mask: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 over the last dimension: 1 at the ``k`` largest entries (ties to the lower index)."""
    order = torch.sort(mask.detach(), dim=-1, descending=True, stable=True).indices
    hard = torch.zeros_like(mask)
    return hard.scatter(-1, order[..., :k], 1.0)


def straight_through(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly the hard top-k of ``mask`` forward; ``mask``'s gradient backward."""
    return hard_topk(mask, k) + (mask - mask.detach())


def gumbel_noise(size: int, seed: int, step: int) -> torch.Tensor:
    """(size,) standard Gumbel noise of ``step``: the same on every rank and in every resumed run."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + NOISE_STREAM)
    u = torch.rand(size, generator=gen, dtype=torch.float64).clamp(1e-12, 1.0 - 1e-12)
    return -torch.log(-torch.log(u))


class HeadLogits(nn.Module):
    """One learnable logit per head, and the mask they give at a temperature and a noise draw.

    Layer scope: one (heads,) logit vector per block, each block's soft top-k keeping its share of
    K. Global scope: one vector over every head of the model and one soft top-k keeping K.
    Logits start at 0: no head is preferred before the search.

    Args:
        geometry: the dense model's geometry.
        target: K and the scope.
        straight_through: run the hard top-k forward (see :func:`straight_through`).
    """

    def __init__(self, geometry: ModelGeometry, target: HeadTarget, straight_through: bool = False) -> None:
        super().__init__()
        self.geometry, self.target, self.straight_through = geometry, target, straight_through
        self.sizes = tuple(g.attention.num_heads for g in geometry.blocks)
        self.counts = layer_counts(geometry, target.total) if target.scope == "layer" else None
        tables = self.sizes if target.scope == "layer" else (total_heads(geometry),)
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in tables)
        self._draw: tuple[float, torch.Tensor | None] = (1.0, None)

    def scores(self) -> tuple[torch.Tensor, ...]:
        """Detached logits per block, on the CPU: the final ranking."""
        flat = torch.cat([w.detach().cpu() for w in self.logits])
        return tuple(flat.split(self.sizes))

    def masks(self, temperature: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(heads,) mask per block at ``temperature`` with ``noise`` (one value per head of the model, or None)."""
        pieces = noise.split(self.sizes) if noise is not None else (None,) * len(self.sizes)
        if self.counts is not None:
            out = []
            for w, k, g in zip(self.logits, self.counts, pieces):
                m = soft_topk(w, k, temperature, g)
                out.append(straight_through(m, k) if self.straight_through else m)
            return tuple(out)
        m = soft_topk(self.logits[0], self.target.total, temperature, noise)
        if self.straight_through:
            m = straight_through(m, self.target.total)
        return tuple(m.split(self.sizes))

    def prepare(self, temperature: float, noise: torch.Tensor | None) -> None:
        """Set the temperature and noise the next forward under :meth:`gating` draws its mask with."""
        self._draw = (temperature, noise)

    @contextlib.contextmanager
    def gating(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the context, ``model``'s heads are masked by the mask of the prepared draw.

        The mask is computed here, inside the student's forward (so DistributedDataParallel sees
        the logits used), in float64 outside any autocast.
        """
        temperature, noise = self._draw
        device = self.logits[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            masks = self.masks(temperature, None if noise is None else noise.to(device))
        with head_gated(model, self.geometry, masks.__getitem__):
            yield model


@dataclass(frozen=True)
class DspResult:
    """What the DSP search found.

    Attributes:
        scores: the learned logits, (heads,) per block.
        heads: the heads each block keeps (the top-k of the logits in the target's scope).
    """

    scores: tuple[torch.Tensor, ...]
    heads: KeptHeads


def dsp_search(
    model: nn.Module,
    geometry: ModelGeometry,
    images: torch.Tensor,
    target: HeadTarget,
    config: DspConfig,
    classifier: bool,
    runtime: Runtime,
    state_path: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> DspResult:
    """Learn the head logits by distillation under the soft top-k mask and return the heads to keep.

    Args:
        model: the dense model; it is not modified.
        geometry: its geometry.
        images: the pool of preprocessed images the batches are drawn from.
        target: K and the scope.
        config: search settings.
        classifier: distil logits (True) or token features (False).
        runtime: device and process group.
        state_path: where to checkpoint and resume; None disables both.
        on_step: called after every finished step (progress reporting, tests).
    """
    if target.total in (0, total_heads(geometry)):  # keep none or all: there is nothing to choose
        scores = tuple(torch.zeros(g.attention.num_heads) for g in geometry.blocks)
        return DspResult(scores, top_heads(scores, target, geometry))
    with on_device(runtime, model):
        scores = _search_loop(model, geometry, images, target, config, classifier, runtime, state_path, on_step)
    return DspResult(scores, top_heads(scores, target, geometry))


def _search_loop(
    model: nn.Module,
    geometry: ModelGeometry,
    images: torch.Tensor,
    target: HeadTarget,
    config: DspConfig,
    classifier: bool,
    runtime: Runtime,
    state_path: Path | None,
    on_step: Callable[[int], None] | None,
) -> tuple[torch.Tensor, ...]:
    """The logit training on ``runtime.device``; returns the logits per block, on the CPU."""
    logits = HeadLogits(geometry, target, config.straight_through).to(runtime.device)
    optimiser = torch.optim.Adam(logits.parameters(), lr=config.lr)
    n = total_heads(geometry)

    def step_loss(step: int, batch: torch.Tensor, student: nn.Module, target: torch.Tensor | None) -> tuple[torch.Tensor, str]:
        t = config.temperature(step)
        logits.prepare(t, gumbel_noise(n, config.seed, step))
        kd = distill_step_loss(model, student, batch, classifier, runtime, target)
        return kd, f"kd {kd.item():.4f}  T {t:.3g}"

    loop = LoopConfig("dsp search", config.steps, config.batch_size, config.seed, config.checkpoint_every)
    train_gates(model, logits, optimiser, images.to(runtime.device), loop, classifier, runtime, step_loss, state_path, on_step)
    return logits.scores()
