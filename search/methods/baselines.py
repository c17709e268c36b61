"""Torch-Pruning as a peer baseline: the same ViT pruned by an established library at matched MACs.

Torch-Pruning (1.6.1) traces the model into a dependency graph and prunes coupled channels
together by group magnitude. We let it prune head dimensions (the same count in every head, as
our plans do) and MLP hidden units, keep the embedding dimension (our method never prunes it,
so the comparison is like for like), and bisect its uniform pruning ratio until the analytic MAC
count (``search.budget.macs``, which includes the N²·d attention products) is within ``tolerance`` of
the target. The package is an optional extra, imported only here and only when called.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from search.core.errors import UserError
from search.budget.macs import describe, model_macs
from search.families import family_of

INSTALL_HINT = "pip install 'prune-export[bench]'"


class BaselineError(UserError):
    """The Torch-Pruning baseline cannot run or cannot reach the requested MACs."""


@dataclass(frozen=True)
class TorchPruningResult:
    """What the bisection settled on: the pruning ratio given to Torch-Pruning and the MACs it gave."""

    pruning_ratio: float
    macs: int
    dense_macs: int
    steps: int

    @property
    def mac_ratio(self) -> float:
        return self.macs / self.dense_macs


def _torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError as err:
        raise BaselineError(f"the Torch-Pruning baseline needs torch-pruning; run {INSTALL_HINT}") from err
    return tp


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    family = family_of(model)
    return [family.attention(block) for block in family.blocks(model)]


def _prune_once(model: nn.Module, ratio: float, example_input: torch.Tensor, round_to: int) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning at ``ratio``, with its attention fixed up."""
    tp = _torch_pruning()
    pruned = copy.deepcopy(model).eval()
    attentions = _attention_modules(pruned)
    for attn in attentions:
        if type(attn).__name__ != "Attention":
            raise BaselineError(f"the Torch-Pruning baseline handles timm's Attention only, not {type(attn).__name__}")
    # The patch embedding roots the embedding-dim group: ignoring it keeps D everywhere.
    ignored = family_of(pruned).embedding_layers(pruned)
    settings = dict(
        model=pruned,
        example_inputs=example_input,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads={attn.qkv: attn.num_heads for attn in attentions},
        prune_head_dims=True,
        prune_num_heads=False,
        round_to=round_to,
    )
    with warnings.catch_warnings():
        # It warns that pos_embed/cls_token would be pruned on their last dim: that is the
        # embedding group, which the ignored patch embedding keeps whole.
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(**settings)
        pruner.step()
    for attn in attentions:
        heads = pruner.num_heads[attn.qkv]
        attn.num_heads = heads
        attn.head_dim = attn.qkv.out_features // (3 * heads)
        attn.attn_dim = heads * attn.head_dim
        # timm's fused path lets SDPA use 1/sqrt(new head_dim); the weights expect the dense
        # scale, which the explicit path applies from ``attn.scale``.
        attn.fused_attn = False
    return pruned


def torch_pruning_search(
    model: nn.Module,
    target_mac_ratio: float,
    example_input: torch.Tensor,
    round_to: int = 8,
    tolerance: float = 0.01,
    max_steps: int = 14,
) -> tuple[nn.Module, TorchPruningResult]:
    """Bisect Torch-Pruning's ratio until MACs are within ``tolerance`` (relative) of the target.

    Returns the pruned model closest to the target and the figures of that step.

    Raises:
        BaselineError: torch-pruning is missing, the model is not a plain timm ViT, or no ratio
            reaches the target within tolerance (the MAC count moves in steps of ``round_to``).
    """
    if not 0.0 < target_mac_ratio <= 1.0:
        raise BaselineError(f"target MAC ratio must be in (0, 1], got {target_mac_ratio}")
    dense = model_macs(describe(model))
    target = target_mac_ratio * dense
    if target_mac_ratio == 1.0:
        return copy.deepcopy(model).eval(), TorchPruningResult(0.0, dense, dense, 0)
    low, high = 0.0, 1.0
    best: tuple[float, nn.Module, TorchPruningResult] | None = None
    for step in range(1, max_steps + 1):
        ratio = (low + high) / 2
        pruned = _prune_once(model, ratio, example_input, round_to)
        macs = model_macs(describe(pruned))
        error = abs(macs - target) / target
        if best is None or error < best[0]:
            best = (error, pruned, TorchPruningResult(ratio, macs, dense, step))
        if error <= tolerance / 4:
            break
        if macs > target:
            low = ratio
        else:
            high = ratio
    assert best is not None
    error, pruned, result = best
    if error > tolerance:
        raise BaselineError(
            f"Torch-Pruning reached {result.mac_ratio:.4f} of the MACs, not {target_mac_ratio} within "
            f"{tolerance:.0%}; its widths move in steps of round_to={round_to}: lower round_to"
        )
    return pruned, result


def torch_pruning_prune(
    model: nn.Module,
    target_mac_ratio: float,
    example_input: torch.Tensor,
    round_to: int = 8,
) -> nn.Module:
    """``model`` pruned by Torch-Pruning (GroupMagnitude; head dims and MLP) to ``target_mac_ratio``.

    The input model is not changed. The result is a timm VisionTransformer that exports with
    ``exporter.onnx_export.export_onnx``; its MACs are within 1% of the target.

    Args:
        model: a dense timm VisionTransformer with timm's ``Attention``.
        target_mac_ratio: fraction of the dense MACs to keep (search.budget.macs count).
        example_input: one input batch, for Torch-Pruning's tracing.
        round_to: kept widths are multiples of this.

    Raises:
        BaselineError: see :func:`torch_pruning_search`.
    """
    return torch_pruning_search(model, target_mac_ratio, example_input, round_to)[0]
