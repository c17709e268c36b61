"""What an attention kind is: the two interfaces, the shapes they report, and the registry.

An attention kind owns everything that differs between kinds of attention, so that the MAC count,
the gates, the activation capture, the initialisation, the surgery and the reweight folding go
through it and never look inside an attention module themselves. As Torch-Pruning keeps
importance apart from per-layer slicing, a kind has two sides, and implements only what it has:

- **cutting** (:class:`AttentionKind`, every kind; surgery, export and the MAC count ask for it):
  recognising a module (``matches``), reading its dense shape (``shape``), every MAC of the module
  at given widths, extra ops included (``macs``), slicing it into its own physically smaller module
  (``slice``), and the linear layer that reweights fold into (``reweight_target``);
- **measuring** (:class:`MeasurableKind`, the kinds the search can score; the searches ask for it
  with :func:`measurable`, which refuses any other kind in one line): its weights seen per head
  (``head_weights``), where the indicators act (``gate``), what the search captures (``capture``),
  how much the output changes when one channel goes (``attention_differences``), and a mask per
  head on its output for head pruning (``head_gate``; one implementation here serves every kind
  that merges its heads head-major right before its reweight target).

Kinds register themselves when their module is imported; ``search.attention`` imports every module
of its package, so a new kind is a new file and nothing else.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from search.core.errors import UnknownModelError

if TYPE_CHECKING:
    from search.cut.blocks import BlockPlan


@dataclass(frozen=True)
class TokenLayout:
    """The tokens every block sees: prefix tokens (class, registers) and then the patch grid.

    Attributes:
        prefix: tokens before the patches.
        grid: (rows, columns) of the patch grid.
    """

    prefix: int
    grid: tuple[int, int]

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        return self.prefix + self.patches


@dataclass(frozen=True)
class AttentionShape:
    """Widths of one attention module.

    Attributes:
        embed_dim: width of the tokens going in and out.
        num_heads: number of heads.
        qk_dim: q/k channels per head.
        v_dim: v channels per head.
    """

    embed_dim: int
    num_heads: int
    qk_dim: int
    v_dim: int


@dataclass(frozen=True)
class HeadWeights:
    """An attention module's linear weights, reshaped per head.

    Attributes:
        q, k: (heads, qk_dim, embed_dim) rows of the input projection.
        v: (heads, v_dim, embed_dim) rows of the input projection.
        proj: (embed_dim, heads, v_dim) columns of the output projection.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    proj: torch.Tensor


@dataclass(frozen=True)
class AttentionActivations:
    """What one attention module computed on a calibration batch, as its kind captured it.

    Attributes:
        q, k: (batch, heads, tokens, qk_dim), at the point where the kind's q/k gates act.
        v: (batch, heads, tokens, v_dim).
        output: (batch, tokens, heads·v_dim) the merged head outputs right before the output
            projection, for kinds whose output is not a simple function of q, k and v (else None).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    output: torch.Tensor | None = None


GateValues = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""Called at every forward: the current (qk, v) gates of one block, shaped (heads, qk_dim), (heads, v_dim)."""

HeadValues = Callable[[], torch.Tensor]
"""Called at every forward: the current mask of one block's heads, shaped (heads,)."""


class AttentionKind(ABC):
    """One kind of attention, as surgery, export and the MAC count see it: the cutting side. Subclasses register an instance.

    Every kind has this side, even one with nothing to measure (a block whose heads were all
    pruned): recognise a module, read its widths, count its MACs, slice it, name the layer that
    reweights fold into. What the search needs besides is :class:`MeasurableKind`.

    Contracts the generic code relies on, beyond each method's own:
    - ``kind_of`` tries the registered kinds in registration order (the package imports its kind
      modules alphabetically) and takes the first whose ``matches`` is true, so ``matches`` must be
      false for every other kind's modules.
    - ``macs`` is also called with fractional widths, as float tensors: the search prices its soft
      widths (the sums of its gates) with it, differentiably. Write it as plain arithmetic on
      ``qk`` and ``v``; no ``int()``, rounding or branching on their values.
    - The sliced module (``slice``) has a ``reweight`` attribute, identity until recovery puts a
      per-(head, v channel) scale there, applied right before ``reweight_target``; folding
      multiplies that layer's input columns by it.
    """

    name: str
    supports: str = ""
    """The modules the kind recognises, in words, for the message that refuses an attention no kind matches (empty: not listed)."""
    shared_v_indices: bool = False
    """True when every head must keep the same v channels (a part shared by the heads reads them)."""

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """True when ``module`` is an attention module of this kind (dense or sliced)."""

    @abstractmethod
    def shape(self, module: nn.Module) -> AttentionShape:
        """The module's widths; UnknownModelError for variants that cannot be pruned."""

    @abstractmethod
    def macs(self, shape: AttentionShape, heads: int, qk: int, v: int, layout: TokenLayout) -> int:
        """MACs of the whole module at batch 1 when it keeps ``heads`` heads of ``qk`` and ``v`` channels.

        Every term must be linear in each of ``qk`` and ``v`` (the budget solver prices a channel by
        the difference of two counts) and must match what the exported graph computes.
        """

    @abstractmethod
    def slice(self, module: nn.Module, plan: BlockPlan) -> nn.Module:
        """A new, physically smaller module that keeps the plan's heads and channels."""

    def fit_logits(self, dense: nn.Module, pruned: nn.Module, plan: BlockPlan, dense_inputs: torch.Tensor,
                   pruned_inputs: torch.Tensor, ridge: float) -> bool:
        """Refit ``pruned``'s queries, in place, so that its kept q/k channels give ``dense``'s attention logits.

        Compensation after the cut (``exporter.compensation``) calls this before it refits the
        output layer. ``dense_inputs`` are what ``dense`` saw on the calibration images, ``pruned_inputs``
        what ``pruned`` sees there now (the already compensated earlier blocks' output, normalised), both
        (images, tokens, embed_dim); ``plan`` is the block's plan, which maps ``pruned``'s heads and
        channels to ``dense``'s. Returns False, changing nothing, when the kind's logits are not a
        bilinear form of its q and k (the default; FLatten's focusing map is not).
        """
        return False

    def choose_qk(self, dense: nn.Module, plan: BlockPlan, dense_inputs: torch.Tensor, pruned_inputs: torch.Tensor,
                  ridge: float) -> tuple[tuple[int, ...], ...] | None:
        """Per kept head, the q/k channels (as many as ``plan`` keeps, the same in every head when the plan's are)
        from which :meth:`fit_logits` reproduces the dense logits best; None (the default) keeps the plan's.

        Compensation after the cut calls this before it re-slices the block; the inputs are as for
        :meth:`fit_logits`. Only a kind that has a logit fit has a criterion for it.
        """
        return None

    def reweight_target(self, module: nn.Module) -> nn.Linear | None:
        """The linear layer right after the ``reweight`` slot (heads × v_dim inputs): reweights fold into it.

        None for a module with no such layer (no head left): nothing is reweighted there.
        """
        return module.proj


class MeasurableKind(AttentionKind):
    """A kind the search can measure: the measuring side, on top of the cutting side it also needs.

    The searches (magnitude, acp, DSP) score channels and heads by reading the weights per head,
    gating the module's channels and heads, capturing its activations and measuring how much its
    output changes when one channel goes. A kind whose modules have nothing to measure is a plain
    :class:`AttentionKind`, and :func:`measurable` refuses it in one line.
    """

    @abstractmethod
    def head_weights(self, module: nn.Module) -> HeadWeights:
        """The q/k/v/proj weights seen per head."""

    @abstractmethod
    def gate(self, module: nn.Module, values: GateValues) -> list[RemovableHandle]:
        """Make ``module``'s forward apply the gates ``values()``; returns the hooks to remove.

        A gate of 0 must act like removing its channel, so the search optimises the model that
        surgery will cut.
        """

    @abstractmethod
    def capture(self, module: nn.Module, sink: Callable[[AttentionActivations], None]) -> list[RemovableHandle]:
        """Hooks that hand the module's activations to ``sink`` on every forward."""

    @abstractmethod
    def attention_differences(self, module: nn.Module, acts: AttentionActivations) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared change of the module's output when one channel alone is removed.

        Returns (qk, v) of shapes (heads, qk_dim) and (heads, v_dim), on the activations' device.
        """

    def head_gate(self, module: nn.Module, values: HeadValues) -> list[RemovableHandle]:
        """Scale head h's output by ``values()[h]`` right before ``reweight_target``; returns the hooks to remove.

        Every kind here merges its heads as (heads × v_dim), head-major, right before that layer, so
        one forward pre-hook that views its input as (…, heads, v_dim) and scales each head's block
        serves them all. A mask of 0 must act like removing the head (as for ``gate``): where the
        other heads' outputs depend on a head's q/k (FLatten's focusing map), the kind adds to this.
        """
        def hook(_module: nn.Module, inputs: tuple) -> tuple:
            x, mask = inputs[0], values()
            heads = mask.shape[0]
            scaled = x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads) * mask.to(x.dtype)[:, None]
            return (scaled.reshape(x.shape), *inputs[1:])

        target = self.reweight_target(module)
        if target is None:
            raise ValueError(f"the {self.name} kind has no layer after its merged heads: override head_gate")
        return [target.register_forward_pre_hook(hook)]


def measurable(kind: AttentionKind, where: str = "") -> MeasurableKind:
    """``kind`` as the search needs it; UnknownModelError naming the kind (and ``where``) if it has nothing to measure."""
    if isinstance(kind, MeasurableKind):
        return kind
    at = f" ({where})" if where else ""
    raise UnknownModelError(f"the search cannot measure attention of kind {kind.name!r}{at}: it has no channels or heads "
                            "to score; search the dense model, before any head was pruned")


_KINDS: dict[str, AttentionKind] = {}


def register_kind(kind: AttentionKind) -> AttentionKind:
    """Add a kind to the registry; kinds are tried in registration order."""
    if kind.name in _KINDS:
        raise ValueError(f"attention kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> AttentionKind:
    """The registered kind called ``name``."""
    return _KINDS[name]


def kind_names() -> list[str]:
    return list(_KINDS)


def kind_of(module: nn.Module) -> AttentionKind:
    """The registered kind that recognises ``module``."""
    for kind in _KINDS.values():
        if kind.matches(module):
            return kind
    supported = ", ".join(kind.supports for kind in _KINDS.values() if kind.supports)
    raise UnknownModelError(f"attention module {type(module).__name__} is not a kind prune-export can prune; it supports {supported}")


def split_fused_qkv(weight: torch.Tensor, heads: int, qk: int, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused qkv weight or bias (rows ordered q | k | v, head-major) into per-head views."""
    q, k, vv = torch.split(weight, [heads * qk, heads * qk, heads * v], dim=0)
    tail = weight.shape[1:]
    return q.reshape(heads, qk, *tail), k.reshape(heads, qk, *tail), vv.reshape(heads, v, *tail)


def head_rows(offset: int, width: int, heads: tuple[int, ...], rows: tuple[tuple[int, ...], ...]) -> list[int]:
    """Flat row indices of the kept channels ``rows[i]`` of kept heads ``heads[i]`` in a head-major block."""
    return [offset + h * width + c for h, kept in zip(heads, rows) for c in kept]
