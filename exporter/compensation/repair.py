"""The block-by-block repair: each block's channels re-chosen and its layers refitted, in order (see the package docstring)."""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from exporter.compensation.choice import choose_units, copy_units, full_hidden, rearrange_attention
from exporter.compensation.fits import fit_layer, stream_target
from exporter.compensation.recording import Recorder, first_block_inputs, relative_error, run_block, token_weights
from exporter.compensation.results import BlockRepair, CompensationConfig, CompensationResult, rechosen
from search.attention import kind_of
from search.budget.plan import Plan
from search.cut.blocks import BlockPlan
from search.core.runtime import Runtime, on_device
from search.families import family_of
from search.families.base import ModelFamily

STREAM_CHECK = 1e-3
"""Largest relative mismatch between a dense block's output and input + γ₁·proj + γ₂·fc2 for the stream target to be used."""


@torch.no_grad()
def compensate(dense: nn.Module, pruned: nn.Module, plan: Plan, images: torch.Tensor, config: CompensationConfig,
               runtime: Runtime, on_block: Callable[[str], None] | None = None) -> CompensationResult:
    """Repair ``pruned`` (a surgery result of ``dense`` by ``plan``) in place, block by block; see the module docstring.

    Runs on ``runtime.device``; both models are handed back on the CPU.
    """
    with on_device(runtime, pruned, dense):
        return _compensate(dense.eval(), pruned.eval(), plan, images[: config.images], config, runtime.device, on_block)


def _compensate(dense: nn.Module, pruned: nn.Module, plan: Plan, images: torch.Tensor, config: CompensationConfig,
                device: torch.device, on_block: Callable[[str], None] | None) -> CompensationResult:
    started = time.perf_counter()
    family = family_of(pruned)
    dense_blocks, pruned_blocks = family_of(dense).blocks(dense), family.blocks(pruned)
    xd = first_block_inputs(dense, images, config.batch, device)
    xp = first_block_inputs(pruned, images, config.batch, device)
    notes: set[str] = set()
    repairs = []
    blocks_plan = list(plan.blocks)
    for i, (bd, bp) in enumerate(zip(dense_blocks, pruned_blocks)):
        attn_d, attn_p = family_of(dense).attention(bd), family.attention(bp)
        kind = kind_of(attn_p)
        has_heads = kind.shape(attn_p).num_heads > 0
        proj_d, proj_p = kind_of(attn_d).reweight_target(attn_d), kind.reweight_target(attn_p) if has_heads else None
        fc1_d, fc2_d = family_of(dense).mlp_linears(bd)

        def record_dense(r: Recorder) -> None:
            r.input_of("attn_in", attn_d)
            r.output_of("proj", proj_d)
            r.output_of("fc2", fc2_d)
            r.input_of("u", fc1_d)

        yd, dense_kept = run_block(bd, xd, record_dense)
        g1, g2 = family.residual_scales(bp) if config.stream else (None, None)
        target = "stream"
        if g1 is not None or g2 is not None:
            gd1 = (g1 if g1 is not None else torch.zeros(1)).to(device)
            gd2 = (g2 if g2 is not None else torch.zeros(1)).to(device)
            rebuilt = [x + gd1 * p + gd2 * f for (x, _), p, f in zip(xd, dense_kept["proj"], dense_kept["fc2"])]
            if g1 is None or g2 is None or relative_error(rebuilt, yd) > STREAM_CHECK:
                g1 = g2 = None  # the dense block is not input + γ₁·proj + γ₂·fc2: fit each layer's own output
        if g1 is None and g2 is None:
            target = "own output"
            notes.add("some blocks fitted each layer's own dense output (the family does not describe its residual stream)")
        saved = copy.deepcopy(bp.state_dict())

        def record_attn_in(r: Recorder) -> None:
            if has_heads:
                r.input_of("attn_in", attn_p)

        yp, pruned_kept = run_block(bp, xp, record_attn_in)
        before = relative_error(yp, yd)
        fitted: list[str] = []
        if has_heads and proj_p is not None:
            blocks_plan[i] = _repair_attention(family, bd, bp, xd, xp, dense_kept, pruned_kept.pop("attn_in"), blocks_plan[i],
                                               g1, config, fitted, notes)
        blocks_plan[i] = _repair_mlp(family, bd, bp, xd, xp, yd, dense_kept, blocks_plan[i], g2, config, fitted)
        yp_new, _ = run_block(bp, xp)
        after = relative_error(yp_new, yd)
        reverted = after > before
        if reverted:
            bp.load_state_dict(saved)
            blocks_plan[i] = plan.blocks[i]
            yp_new, after = yp, before
        repairs.append(BlockRepair(i, before, after, tuple(fitted), target, reverted))
        if on_block is not None:
            on_block(f"block {i}: error {before:.4f} → {after:.4f}")
        xd = [(y, kwargs) for y, (_, kwargs) in zip(yd, xd)]
        xp = [(y, kwargs) for y, (_, kwargs) in zip(yp_new, xp)]
    final = replace(plan, blocks=tuple(blocks_plan))
    return CompensationResult(tuple(repairs), len(images), time.perf_counter() - started, tuple(sorted(notes)), final,
                              rechosen(plan, final))


Batches = list[tuple[torch.Tensor, dict]]


def _repair_attention(family: ModelFamily, bd: nn.Module, bp: nn.Module, xd: Batches, xp: Batches, dense_kept: dict[str, list[torch.Tensor]],
                      batches: list[torch.Tensor], block: BlockPlan, g1: torch.Tensor | None, config: CompensationConfig,
                      fitted: list[str], notes: set[str]) -> BlockPlan:
    """Steps 1-3 of the package docstring for one block's attention: channels re-chosen, logits and proj refitted.

    ``batches`` are the inputs the pruned attention sees; returns the block's plan with its kept channels."""
    device = xd[0][0].device
    attn_d = family.attention(bd)
    kind = kind_of(family.attention(bp))
    targets, weights = dense_kept["proj"], None
    if g1 is not None:
        mid_d = [x + g1.to(device) * p for (x, _), p in zip(xd, dense_kept["proj"])]
        targets = stream_target([torch.zeros_like(p) for p in dense_kept["proj"]], mid_d, [x for x, _ in xp], g1)
        weights = [token_weights(m) for m in mid_d]
    attn_in_d, attn_in_p = torch.cat(dense_kept["attn_in"]), torch.cat(batches)
    if config.rearrange:
        block = rearrange_attention(kind, attn_d, block, attn_in_d, attn_in_p, batches, targets, weights, g1, config.ridge)
        family.set_attention(bp, kind.slice(attn_d, block))
        fitted.append("channels")
    attn_p = family.attention(bp)
    if config.logits:
        if kind.fit_logits(attn_d, attn_p, block, attn_in_d, attn_in_p, config.ridge):
            fitted.append("logits")
        else:
            notes.add(f"{kind.name} attention: no logit fit (its scores are not q·k)")
    del attn_in_d, attn_in_p, batches
    proj_p = kind.reweight_target(attn_p)
    _, kept = run_block(bp, xp, lambda r: r.input_of("z", proj_p))
    fit_layer(proj_p, kept["z"], targets, config.ridge, g1, weights)
    fitted.append("proj")
    return block


def _repair_mlp(family: ModelFamily, bd: nn.Module, bp: nn.Module, xd: Batches, xp: Batches, yd: list[torch.Tensor],
                dense_kept: dict[str, list[torch.Tensor]], block: BlockPlan, g2: torch.Tensor | None, config: CompensationConfig,
                fitted: list[str]) -> BlockPlan:
    """Step 3 for one block's MLP: fc1's kept rows refitted, the kept units re-chosen, fc2 refitted; returns the block's plan."""
    device = xd[0][0].device
    (fc1_d, fc2_d), (fc1_p, fc2_p) = family.mlp_linears(bd), family.mlp_linears(bp)
    outs, kept = run_block(bp, xp, lambda r: (r.input_of("h", fc2_p), r.output_of("fc2", fc2_p), r.input_of("u", fc1_p)))
    targets = dense_kept["fc2"]
    if g2 is not None:
        mid_p = [y - g2.to(device) * f for y, f in zip(outs, kept["fc2"])]
        mid_d = [y - g2.to(device) * f for y, f in zip(yd, dense_kept["fc2"])]
        targets = stream_target(dense_kept["fc2"], mid_d, mid_p, g2)
    token_w = [token_weights(y) for y in yd] if g2 is not None else None
    units = block.mlp
    fc1_source = fc1_d
    if config.inputs:  # fc1's rows refitted to the dense pre-activations from the inputs the pruned MLP sees
        fc1_source = copy.deepcopy(fc1_d)
        fit_layer(fc1_source, kept["u"], (fc1_d(u) for u in dense_kept["u"]), config.ridge, None)
        fitted.append("fc1")
    hidden = kept["h"]
    if config.rearrange or config.inputs:
        full = full_hidden(bd, fc1_d, fc1_source, fc2_d, xd, kept["u"])
        if config.rearrange:
            units = choose_units(full, targets, token_w, g2, fc2_d, len(units), config.ridge)
            block = replace(block, mlp=units)
            fitted.append("units")
        copy_units(fc1_source, fc2_d, fc1_p, fc2_p, units)
        hidden = [h[..., list(units)] for h in full]
        del full
    fit_layer(fc2_p, hidden, targets, config.ridge, g2, token_w)
    fitted.append("fc2")
    return block


