"""Which channels and units a compensated block keeps: re-chosen, with the plan's counts, by the error left after the refit."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from exporter.compensation.fits import normal_equations, row_weights
from exporter.compensation.recording import Recorder
from search.attention.base import head_rows
from search.cut.blocks import BlockPlan
from search.cut.least_squares import prior_of, ridge_solve
from search.cut.selection import keep_least_loss


def rearrange_attention(kind: Any, dense: nn.Module, block: BlockPlan, dense_inputs: torch.Tensor, pruned_inputs: torch.Tensor,
                         batches: list[torch.Tensor], targets: list[torch.Tensor], token_w: list[torch.Tensor] | None,
                         scale: torch.Tensor | None, ridge: float) -> BlockPlan:
    """The block's plan with its q/k channels chosen by the kind (:meth:`~search.attention.base.AttentionKind.choose_qk`)
    and its v channels as those from which the output layer's refit loses least, the counts unchanged.

    The output layer's inputs for every v channel are read from the dense attention run on the inputs the
    pruned block sees (its attention map is what the logit fit then aims at). v channels are re-chosen only
    when every head keeps the same ones (the default); a plan with indices per head keeps its v channels.
    """
    qk = kind.choose_qk(dense, block, dense_inputs, pruned_inputs, ridge) or block.qk
    if not block.shared_indices:
        return replace(block, qk=qk)
    proj = kind.reweight_target(dense)
    dv = kind.shape(dense).v_dim
    every = tuple(range(dv))
    cols = head_rows(0, dv, block.heads, (every,) * len(block.heads))
    recorder = Recorder()
    recorder.input_of("z", proj)
    try:
        for x in batches:
            dense(x)
    finally:
        recorder.remove()
    eq = normal_equations((z[..., cols] for z in recorder.kept["z"]), targets, (len(cols), proj.out_features), token_w)
    metric = row_weights(scale)
    prior = prior_of(proj)
    prior = torch.cat([prior[:, cols], prior[:, -1:]], dim=1)
    full = ridge_solve(eq, prior, ridge, row_weights=metric)
    heads = len(block.heads)
    groups = [[h * dv + j for h in range(heads)] for j in range(dv)]
    v = tuple(keep_least_loss(eq.gram, full, len(block.v[0]), groups, metric, damp=ridge))
    return replace(block, qk=qk, v=(v,) * heads)


def full_hidden(dense_block: nn.Module, fc1: nn.Linear, fc1_source: nn.Linear, fc2: nn.Linear,
                 dense_inputs: list[tuple[torch.Tensor, dict]], mlp_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every hidden unit's activation on the inputs the pruned MLP sees, with ``fc1_source``'s weights: the dense
    block is run with its fc1 output replaced by ``fc1_source`` applied to the pruned block's MLP input, and
    fc2's input is kept."""
    feed = iter(mlp_inputs)
    recorder = Recorder()
    recorder.input_of("h", fc2)
    swap = fc1.register_forward_hook(lambda _m, _args, _out: fc1_source(next(feed)))
    try:
        for x, kwargs in dense_inputs:
            dense_block(x, **kwargs)
    finally:
        swap.remove()
        recorder.remove()
    return recorder.kept["h"]


def choose_units(hidden: list[torch.Tensor], targets: list[torch.Tensor], token_w: list[torch.Tensor] | None,
                  scale: torch.Tensor | None, fc2: nn.Linear, keep: int, ridge: float) -> tuple[int, ...]:
    """The ``keep`` hidden units (of all of ``hidden``'s) from which fc2's refit to ``targets`` loses least."""
    eq = normal_equations(hidden, targets, (fc2.in_features, fc2.out_features), token_w)
    metric = row_weights(scale)
    full = ridge_solve(eq, prior_of(fc2), ridge, row_weights=metric)
    return tuple(keep_least_loss(eq.gram, full, keep, [[u] for u in range(fc2.in_features)], metric, damp=ridge))


def copy_units(fc1_source: nn.Linear, fc2: nn.Linear, fc1_p: nn.Linear, fc2_p: nn.Linear, units: tuple[int, ...]) -> None:
    """Write the rows of ``fc1_source`` and the dense fc2 columns of ``units`` into the pruned MLP's layers."""
    index = torch.tensor(units, device=fc1_source.weight.device)
    fc1_p.weight.copy_(fc1_source.weight[index])
    if fc1_p.bias is not None:
        fc1_p.bias.copy_(fc1_source.bias[index])
    fc2_p.weight.copy_(fc2.weight[:, index])


