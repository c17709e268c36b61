"""What a model family is: how blocks, their attention and MLP, and the tokens are found.

Everything generic (MAC count, gates, capture, initialisation, surgery, reweights, distillation,
export and the ORT target) reaches into a model only through its family and the attention kind of
each block, so a new family of models is a new file in this package (or, for a test, one file in
tests/: see tests/test_toy_family.py). What a family answers about the whole model: its blocks,
its token layout, its width (``embed_dim``), the input it is built for (``input_size``), its final
tokens (``features``), its classes (``classes``), every block's heads (``head_counts``), how it cuts
patches (``patch_input``), the layers that carry its width outside the blocks (``embedding_layers``), the MACs no
plan changes and how to split it for the latency model.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from search.attention import kind_of
from search.attention.base import TokenLayout
from search.core.errors import UnknownModelError


@dataclass(frozen=True)
class PatchInput:
    """How a model cuts its input into patches, which decides what an input size that is not a multiple does.

    Attributes:
        patch: side of a patch in pixels.
        pads: the model pads the image to whole patches, so every pixel is seen.
        strict: the model runs only at the size it was built for; a model that is neither strict nor
            padding refuses a size that is not a multiple of the patch.
    """

    patch: int
    pads: bool
    strict: bool


class ModelFamily(ABC):
    """One family of vision transformers, as the pruning code sees it. Subclasses register an instance."""

    name: str
    supports: str = ""
    """What the family covers, in words, for the message that refuses a model no family matches."""

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """True when ``model`` belongs to this family."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put ``model`` in the form the pruning code reads, once, right after its weights are loaded.

        The same function in modules the attention kinds own (BEiT's attention becomes the softmax
        kind's); the default changes nothing. Returns the model (changed in place).
        """
        return model

    @abstractmethod
    def check(self, model: nn.Module) -> None:
        """Raise UnknownModelError for variants the pruning code cannot handle."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    @abstractmethod
    def attention(self, block: nn.Module) -> nn.Module:
        """The block's attention module."""

    @abstractmethod
    def set_attention(self, block: nn.Module, module: nn.Module) -> None:
        """Replace the block's attention module."""

    @abstractmethod
    def drop_attention(self, model: nn.Module, index: int) -> nn.Module:
        """Remove block ``index``'s attention branch, keeping the residual and the MLP branch; returns the block now there.

        For a block that keeps no head: the exported graph must then compute nothing of that
        branch (no normalisation, no zero added), and the block's attention slot must hold a
        :class:`search.attention.removed.RemovedAttention` so the pruned model is still described.
        """

    @abstractmethod
    def mlp_linears(self, block: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        """The MLP's first and second linear layers (hidden units are fc1's rows and fc2's columns)."""

    @abstractmethod
    def mlp_activation(self, block: nn.Module) -> nn.Module:
        """The module whose output is the MLP's hidden activation (where MLP gates act and capture reads)."""

    @abstractmethod
    def slice_mlp(self, block: nn.Module, units: Sequence[int]) -> None:
        """Keep only hidden ``units`` of the block's MLP, in place."""

    @abstractmethod
    def set_mlp_reweight(self, block: nn.Module, module: nn.Module) -> None:
        """Put ``module`` on the MLP hidden activation, right before the second linear layer."""

    @abstractmethod
    def mlp_reweight(self, block: nn.Module) -> nn.Module:
        """What sits in the MLP's reweight slot (an identity unless recovery put a reweight there)."""

    @abstractmethod
    def layout(self, model: nn.Module) -> TokenLayout:
        """The tokens every block sees."""

    @abstractmethod
    def embed_dim(self, model: nn.Module) -> int:
        """Token width D: what every block takes and gives, never pruned."""

    @abstractmethod
    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model is built for (the token grid follows from it)."""

    def patch_input(self, model: nn.Module) -> PatchInput | None:
        """How the model cuts images into patches; None when it does not say (no input-size warning is given)."""
        return None

    def embedding_layers(self, model: nn.Module) -> list[nn.Module]:
        """The layers outside the blocks that make or read the token width (patch projection, classifier).

        A pruner that follows the width through the graph (the Torch-Pruning baseline) must leave them
        alone to keep D. A family that cannot name them refuses that baseline.
        """
        raise UnknownModelError(f"the {self.name} family does not name its embedding layers, which the Torch-Pruning "
                                "baseline must leave alone; use --method acp or magnitude")

    @abstractmethod
    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The backbone's final tokens, normalised as its pooling or head reads them: (batch, tokens, embed_dim).

        Backbone distillation matches these after every block's output (``search.methods.distill``): the
        same shape as a block's output, token 0 being the one a class-token model pools.
        """

    @abstractmethod
    def classes(self, model: nn.Module) -> int:
        """Classes the model's head predicts; 0 for a backbone, whose output is its pooled features."""

    def head_counts(self, model: nn.Module) -> tuple[int, ...]:
        """Every block's attention heads, in block order (0 for a block that kept none).

        Head pruning leaves blocks with different counts, so nothing may take one block's count for
        all; read through each block's attention kind, so a family need not override it.
        """
        counts = []
        for block in self.blocks(model):
            attn = self.attention(block)
            counts.append(kind_of(attn).shape(attn).num_heads)
        return tuple(counts)

    def residual_scales(self, block: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """How the attention's output layer and fc2 reach the residual stream: a per-channel scale each, or None.

        A pre-norm block adds γ ⊙ (output layer) to its input, γ being LayerScale or ones; then the
        stream a fit must reproduce is a linear function of that layer's output, and compensation
        (``exporter.compensation``) fits the layer to the dense stream itself, which also takes back
        the drift of the blocks before it. None for a branch that normalises or otherwise transforms
        the layer's output on its way (post-norm blocks), or that the family does not describe (the
        default): compensation then fits that layer's own dense output instead, and says so.
        """
        return None, None

    @abstractmethod
    def fixed_macs(self, model: nn.Module) -> int:
        """MACs at batch 1 that no plan changes (patch embedding, head)."""

    def keep_blocks(self, model: nn.Module, indices: Sequence[int]) -> nn.Module:
        """A copy of ``model`` that keeps only blocks ``indices`` (none: the fixed parts alone).

        The latency model times these: one block at a time, and the model without any block.
        The blocks not kept are not copied.
        """
        raise UnknownModelError(f"the {self.name} family cannot split its model into parts, so no latency table can be timed")

    def mlp_macs(self, embed_dim: int, hidden: int, layout: TokenLayout) -> int:
        """MACs of a two-layer MLP of ``hidden`` units at batch 1."""
        return 2 * layout.tokens * embed_dim * hidden


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family to the registry; families are tried in registration order."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name``."""
    return _FAMILIES[name]


def prepare(model: nn.Module) -> nn.Module:
    """``model`` in the form its family prunes (see :meth:`ModelFamily.prepare`); unchanged when no family matches."""
    for family in _FAMILIES.values():
        if family.matches(model):
            return family.prepare(model)
    return model


def family_of(model: nn.Module) -> ModelFamily:
    """The registered family of ``model``; UnknownModelError naming what is supported otherwise."""
    for family in _FAMILIES.values():
        if family.matches(model):
            family.check(model)
            return family
    supported = "; ".join(family.supports or family.name for family in _FAMILIES.values())
    raise UnknownModelError(f"{type(model).__name__} is not a model family prune-export can prune; it supports {supported}")
