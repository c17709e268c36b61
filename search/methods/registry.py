"""Selection methods: named ways of choosing what to keep, all ending in the same Plan.

A method may first choose whole heads (``heads``: a head-pruning method, see ``search.methods.heads``) and
then score channels (``score``: a ``ChannelChoice``, one ``BlockScores`` per block and, for a
search, the widths it converged to); ``search.budget.allocate.make_plan`` turns any method's choice into a
Plan under the budget, on the kept heads only when heads were chosen.
A method without ``score`` keeps its heads whole (``search.budget.allocate.head_plan``).

- ``acp``, ``magnitude``, ``random``: channels of every head.
- ``dsp``: heads only, learned by differentiable subset pruning (``search.methods.dsp``).
- ``dsp+acp``: heads by DSP first, then acp on the channels of the kept heads, under one budget.
- ``head-magnitude``: heads only, the lowest-magnitude heads removed (the baseline DSP must beat).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from search.methods.acp import AcpConfig, acp_search
from search.core.choices import HEAD_SHARE, METHOD_NAMES
from search.core.runtime import Runtime
from search.budget.cost import MACS, CostModel
from search.methods.dsp import DspConfig, dsp_search
from search.methods.heads import HeadTarget, head_magnitude_scores, top_heads
from search.methods.importance import BlockScores, magnitude_scores, random_scores
from search.budget.macs import ModelGeometry
from search.cut.blocks import BlockWidths, KeptHeads


@dataclass(frozen=True)
class SearchInputs:
    """What a method may look at.

    Attributes:
        model: the dense model.
        geometry: its geometry.
        images: preprocessed images (from --data, or random inputs without it).
        classifier: whether the model outputs logits (else token features).
        acp: settings of the acp search (budget, steps, ablation switches).
        runtime: device and process group.
        state_path: where a resumable method checkpoints its state.
        heads: how many heads a head-pruning method keeps, and over which scope (None for others).
        dsp: settings of the DSP head search.
        kept: the heads chosen by the method's head stage, once it ran (None: every head).
        cost: what the budget is a fraction of (``search.budget.cost``: MACs, or a measured latency table).
    """

    model: nn.Module
    geometry: ModelGeometry
    images: torch.Tensor
    classifier: bool
    acp: AcpConfig
    runtime: Runtime
    state_path: Path | None = None
    heads: HeadTarget | None = None
    dsp: DspConfig = DspConfig()
    kept: KeptHeads | None = None
    cost: CostModel = MACS

    def stage_path(self, stage: str) -> Path | None:
        """The checkpoint of one stage of a two-stage method (``search-KEY-heads.pt``)."""
        return None if self.state_path is None else self.state_path.with_name(f"{self.state_path.stem}-{stage}.pt")


@dataclass(frozen=True)
class ChannelChoice:
    """What a channel-scoring method found.

    Attributes:
        scores: importance per block (higher is kept).
        widths: the soft widths a search converged to (None for a method that only scores); the
            plan takes them when widths come from the search (``--widths search``).
    """

    scores: tuple[BlockScores, ...]
    widths: tuple[BlockWidths, ...] | None = None


@dataclass(frozen=True)
class Method:
    """A selection method.

    Attributes:
        score: channel scores per block; None for a method that keeps its heads whole.
        normalise: whether its scores need per-group normalising in the solver.
        heads: chooses the heads to keep first; None for a method that keeps every head.
    """

    score: Callable[[SearchInputs], ChannelChoice] | None
    normalise: bool
    heads: Callable[[SearchInputs], KeptHeads] | None = None

    @property
    def prunes_heads(self) -> bool:
        return self.heads is not None

    @property
    def prunes_channels(self) -> bool:
        return self.score is not None


def _dsp_heads(i: SearchInputs) -> KeptHeads:
    assert i.heads is not None, "a head-pruning method needs a HeadTarget"
    return dsp_search(i.model, i.geometry, i.images, i.heads, i.dsp, i.classifier, i.runtime, i.stage_path("heads")).heads


def _magnitude_heads(i: SearchInputs) -> KeptHeads:
    assert i.heads is not None, "a head-pruning method needs a HeadTarget"
    return top_heads(head_magnitude_scores(i.model), i.heads, i.geometry)


def _acp(i: SearchInputs) -> ChannelChoice:
    found = acp_search(i.model, i.geometry, i.images, i.acp, i.classifier, i.runtime, i.state_path, heads=i.kept, cost=i.cost)
    return ChannelChoice(found.scores, found.widths)


METHODS: dict[str, Method] = {
    "acp": Method(_acp, normalise=False),
    "magnitude": Method(lambda i: ChannelChoice(magnitude_scores(i.model)), normalise=True),
    "random": Method(lambda i: ChannelChoice(random_scores(i.geometry, i.acp.seed)), normalise=True),
    "dsp": Method(None, normalise=False, heads=_dsp_heads),
    "dsp+acp": Method(_acp, normalise=False, heads=_dsp_heads),
    "head-magnitude": Method(None, normalise=False, heads=_magnitude_heads),
}


SEARCHES_CHANNELS = ("acp", "dsp+acp")
"""The methods that run the acp channel search, the ones its settings (--indicator, --widths, ...) apply to."""


def method_names() -> list[str]:
    return sorted(METHODS)


assert set(METHODS) == set(METHOD_NAMES), "search.core.choices.METHOD_NAMES must list every method (the CLI checks against it)"


def head_budget(method: str, budget: float, share: float = HEAD_SHARE) -> float:
    """The budget the head-only model must meet when K is derived from ``budget``.

    A heads-only method (dsp, head-magnitude) meets the whole budget with heads. A method that cuts
    channels afterwards (dsp+acp) leaves part of the cut to them: heads take ``share`` of it, so
    the head-only model keeps 1 − share·(1 − budget) and the channel search brings it to ``budget``.
    """
    return budget if not METHODS[method].prunes_channels else 1.0 - share * (1.0 - budget)
