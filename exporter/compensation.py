"""Compensation after the cut: refit, in closed form, the layers that read a cut dimension.

A cut removes q/k and v channels and MLP units; what is kept can say much of what was removed.
From calibration images (the run's search images: the user's, or the built-in photographs) the
pruned model is repaired block by block, in order, each block fed by the already compensated
blocks before it:

1. **logits** (kinds whose scores are q·k: softmax): the kept q rows are refitted so that q'·k'
   reproduces the dense scores (the kind's :meth:`~search.attention.base.AttentionKind.fit_logits`);
2. **output layer** (``proj``, the layer reweights fold into): refitted from the kept heads' merged
   outputs;
3. **fc2**: refitted from the kept hidden units.

Each refit is ridge least squares toward the sliced dense weights (``search.cut.least_squares``).
Where the family says how a layer reaches the residual stream (a per-channel scale,
``residual_scales``), the target is the **dense residual stream** after the branch, not the
branch's own output: then each fit also takes back the drift left by the blocks before it (a
probe here: cosine to dense 0.863 with the stream target, 0.82 with the branch's own output, and
k-NN 68.4 against 55.2). A block whose output came out farther from the dense block's than the
plain cut's is put back as cut, so compensation never makes a block worse on the calibration set.

The refitted layers are exactly those reweights fold into, so the reweights start as the identity
on top of the compensated weights, and the exported graph has the same shape as without it.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from search.attention import kind_of
from search.attention.base import head_rows
from search.budget.plan import Plan
from search.cut.blocks import BlockPlan
from search.core.runtime import Runtime, on_device
from search.cut.least_squares import NormalEquations, load_fit, prior_of, ridge_solve
from search.cut.selection import keep_least_loss
from search.families import family_of

STREAM_CHECK = 1e-3
"""Largest relative mismatch between a dense block's output and input + γ₁·proj + γ₂·fc2 for the stream target to be used."""


@dataclass(frozen=True)
class CompensationConfig:
    """Settings of compensation after the cut.

    Attributes:
        images: calibration images drawn from the start of the search pool (fewer if the pool is smaller).
        ridge: λ of every refit, relative to the mean diagonal of its Gram matrix; pulls toward the plain
            cut's weights. Measured on dinov2_s at 112 px (acp plan at 0.63, held-out feature cosine to
            dense, no recovery; 0.484 as cut): 128 images 0.755 at 1e-3, 0.831 at 1e-2, 0.874 at 0.1,
            0.877 at 0.3, 0.864 at 1; 512 images 0.917 at 0.03 and 0.916 at 0.1. Too little ridge
            fits the calibration crops, not the model.
        logits: refit the queries to the dense logits where the kind allows it.
        stream: fit to the dense residual stream where the family describes it (else each layer's own output).
        rearrange: re-choose which channels and units a block keeps (the same counts) by the error left after
            the refit (``search.cut.selection``), not by importance before it.
        batch: images per forward pass.
    """

    images: int = 256
    ridge: float = 0.1
    logits: bool = True
    stream: bool = True
    rearrange: bool = True
    batch: int = 16


@dataclass(frozen=True)
class BlockRepair:
    """What compensation did to one block: its relative output error against the dense block, before and after."""

    index: int
    before: float
    after: float
    fitted: tuple[str, ...]
    target: str
    reverted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.index, "before": self.before, "after": self.after, "fitted": list(self.fitted),
                "target": self.target, "reverted": self.reverted}


@dataclass(frozen=True)
class CompensationResult:
    """The repair of a whole model: per block, and the notes the report carries (what could not be fitted)."""

    blocks: tuple[BlockRepair, ...]
    images: int
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    plan: Plan | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "seconds": round(self.seconds, 2), "notes": list(self.notes),
                "blocks": [b.to_dict() for b in self.blocks]}

    def describe(self) -> str:
        """One line: the last block's error before and after, and the time."""
        last = self.blocks[-1]
        return (f"{len(self.blocks)} blocks from {self.images} images in {self.seconds:.0f} s; last block's error to dense "
                f"{last.before:.4f} → {last.after:.4f}" + (f" ({'; '.join(self.notes)})" if self.notes else ""))


class _Stop(Exception):
    """Raised by the hook that captured the first block's input: the rest of the forward is not needed."""


def _first_block_inputs(model: nn.Module, images: torch.Tensor, batch: int, device: torch.device) -> list[tuple[torch.Tensor, dict]]:
    """What the model hands its first block, per batch of images: the tokens and any keyword arguments."""
    first = family_of(model).blocks(model)[0]
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args[0].detach(), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in images.split(batch):
            try:
                model(chunk.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


class _Recorder:
    """Forward hooks that keep one tensor per call: a module's input (``pre``) or output."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.kept: dict[str, list[torch.Tensor]] = {}

    def input_of(self, name: str, module: nn.Module) -> None:
        self.kept[name] = []
        self.handles.append(module.register_forward_pre_hook(lambda _m, args: self.kept[name].append(args[0].detach())))

    def output_of(self, name: str, module: nn.Module) -> None:
        self.kept[name] = []
        self.handles.append(module.register_forward_hook(lambda _m, _a, out: self.kept[name].append(out.detach())))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, dict]], record: Callable[[_Recorder], None] | None = None
               ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The block's output on every batch, and what ``record`` asked to keep on the way."""
    recorder = _Recorder()
    if record is not None:
        record(recorder)
    try:
        outputs = [block(x, **kwargs).detach() for x, kwargs in inputs]
    finally:
        recorder.remove()
    return outputs, recorder.kept


def _relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    err = sum(float((o - t).double().pow(2).sum()) for o, t in zip(outputs, targets))
    return err / max(sum(float(t.double().pow(2).sum()) for t in targets), 1e-30)


def token_weights(stream: torch.Tensor) -> torch.Tensor:
    """One weight per token: 1 / its variance over channels in the dense stream.

    The stream is read through a LayerNorm (the next block's, or the final one), which divides every
    token by its own spread; DINOv2's streams carry a few tokens of norm far above the rest, and an
    unweighted fit spends itself on them while the normalised features the model ends with see them no more than others.
    """
    return 1.0 / stream.float().var(dim=-1).clamp_min(1e-6)


def _fit_layer(layer: nn.Linear, inputs: list[torch.Tensor], targets: list[torch.Tensor], ridge: float,
               scale: torch.Tensor | None, weights: list[torch.Tensor] | None = None) -> None:
    """Refit ``layer`` by ridge toward its own weights so that ``scale ⊙ layer(inputs)`` matches ``scale ⊙ targets``."""
    eq = NormalEquations(layer.in_features, layer.out_features)
    for n, (z, t) in enumerate(zip(inputs, targets)):
        eq.add(z, t, None if weights is None else weights[n])
    weights = None if scale is None else scale.double().pow(2).clamp_min(1e-12)
    load_fit(layer, ridge_solve(eq, prior_of(layer), ridge, row_weights=weights, bias=layer.bias is not None))


def _stream_target(layer_out: list[torch.Tensor], dense_stream: list[torch.Tensor], pruned_stream: list[torch.Tensor],
                   scale: torch.Tensor) -> list[torch.Tensor]:
    """What the layer should output so that pruned stream + scale ⊙ output equals the dense stream + scale ⊙ dense output."""
    s = scale.to(layer_out[0].device)
    safe = torch.where(s.abs() > 1e-12, s, torch.ones_like(s))
    return [o + (d - p) / safe for o, d, p in zip(layer_out, dense_stream, pruned_stream)]


def _full_hidden(dense_block: nn.Module, fc1: nn.Linear, fc2: nn.Linear, dense_inputs: list[tuple[torch.Tensor, dict]],
                 mlp_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every dense hidden unit's activation on the inputs the pruned MLP sees: the dense block is run with its
    fc1 input replaced by the pruned block's, and fc2's input is kept."""
    feed = iter(mlp_inputs)
    recorder = _Recorder()
    recorder.input_of("h", fc2)
    swap = fc1.register_forward_pre_hook(lambda _m, _args: (next(feed),))
    try:
        for x, kwargs in dense_inputs:
            dense_block(x, **kwargs)
    finally:
        swap.remove()
        recorder.remove()
    return recorder.kept["h"]


def _rearrange_attention(kind: Any, dense: nn.Module, block: BlockPlan, dense_inputs: torch.Tensor, pruned_inputs: torch.Tensor,
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
    eq = NormalEquations(len(cols), proj.out_features)
    recorder = _Recorder()
    recorder.input_of("z", proj)
    try:
        for x in batches:
            dense(x)
    finally:
        recorder.remove()
    for n, (z, t) in enumerate(zip(recorder.kept["z"], targets)):
        eq.add(z[..., cols], t, None if token_w is None else token_w[n])
    metric = None if scale is None else scale.double().pow(2).clamp_min(1e-12)
    prior = prior_of(proj)
    prior = torch.cat([prior[:, cols], prior[:, -1:]], dim=1)
    full = ridge_solve(eq, prior, ridge, row_weights=metric)
    heads = len(block.heads)
    groups = [[h * dv + j for h in range(heads)] for j in range(dv)]
    v = tuple(keep_least_loss(eq.gram, full, len(block.v[0]), groups, metric, damp=ridge))
    return replace(block, qk=qk, v=(v,) * heads)


def _rearrange_mlp(dense_block: nn.Module, fc1_d: nn.Linear, fc2_d: nn.Linear, fc1_p: nn.Linear, fc2_p: nn.Linear,
                   dense_inputs: list[tuple[torch.Tensor, dict]], mlp_inputs: list[torch.Tensor], targets: list[torch.Tensor],
                   token_w: list[torch.Tensor] | None, scale: torch.Tensor | None, ridge: float
                   ) -> tuple[tuple[int, ...], list[torch.Tensor]]:
    """Re-choose the block's kept MLP units (as many as it keeps) as those from which fc2's refit loses least,
    and copy the dense fc1 rows and fc2 columns of the new units into the pruned layers; also every unit's activations."""
    hidden = _full_hidden(dense_block, fc1_d, fc2_d, dense_inputs, mlp_inputs)
    eq = NormalEquations(fc2_d.in_features, fc2_d.out_features)
    for n, (h, t) in enumerate(zip(hidden, targets)):
        eq.add(h, t, None if token_w is None else token_w[n])
    metric = None if scale is None else scale.double().pow(2).clamp_min(1e-12)
    full = ridge_solve(eq, prior_of(fc2_d), ridge, row_weights=metric)
    groups = [[u] for u in range(fc2_d.in_features)]
    units = tuple(keep_least_loss(eq.gram, full, fc2_p.in_features, groups, metric, damp=ridge))
    index = torch.tensor(units, device=fc1_d.weight.device)
    fc1_p.weight.copy_(fc1_d.weight[index])
    if fc1_p.bias is not None:
        fc1_p.bias.copy_(fc1_d.bias[index])
    fc2_p.weight.copy_(fc2_d.weight[:, index])
    return units, hidden


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
    xd = _first_block_inputs(dense, images, config.batch, device)
    xp = _first_block_inputs(pruned, images, config.batch, device)
    notes: set[str] = set()
    repairs = []
    blocks_plan = list(plan.blocks)
    for i, (bd, bp) in enumerate(zip(dense_blocks, pruned_blocks)):
        attn_d, attn_p = family_of(dense).attention(bd), family.attention(bp)
        kind = kind_of(attn_p)
        has_heads = kind.shape(attn_p).num_heads > 0
        proj_d, proj_p = kind_of(attn_d).reweight_target(attn_d), kind.reweight_target(attn_p) if has_heads else None
        (fc1_d, fc2_d), (fc1_p, fc2_p) = family_of(dense).mlp_linears(bd), family.mlp_linears(bp)

        def record_dense(r: _Recorder) -> None:
            r.input_of("attn_in", attn_d)
            r.output_of("proj", proj_d)
            r.output_of("fc2", fc2_d)

        yd, dense_kept = _run_block(bd, xd, record_dense)
        g1, g2 = family.residual_scales(bp) if config.stream else (None, None)
        target = "stream"
        if g1 is not None or g2 is not None:
            gd1 = (g1 if g1 is not None else torch.zeros(1)).to(device)
            gd2 = (g2 if g2 is not None else torch.zeros(1)).to(device)
            rebuilt = [x + gd1 * p + gd2 * f for (x, _), p, f in zip(xd, dense_kept["proj"], dense_kept["fc2"])]
            if g1 is None or g2 is None or _relative_error(rebuilt, yd) > STREAM_CHECK:
                g1 = g2 = None  # the dense block is not input + γ₁·proj + γ₂·fc2: fit each layer's own output
        if g1 is None and g2 is None:
            target = "own output"
            notes.add("some blocks fitted each layer's own dense output (the family does not describe its residual stream)")
        saved = copy.deepcopy(bp.state_dict())

        def record_attn_in(r: _Recorder) -> None:
            if has_heads:
                r.input_of("attn_in", attn_p)

        yp, pruned_kept = _run_block(bp, xp, record_attn_in)
        before = _relative_error(yp, yd)
        fitted: list[str] = []
        if has_heads and proj_p is not None:
            targets, weights = dense_kept["proj"], None
            if g1 is not None:
                mid_d = [x + g1.to(device) * p for (x, _), p in zip(xd, dense_kept["proj"])]
                targets = _stream_target([torch.zeros_like(p) for p in dense_kept["proj"]], mid_d, [x for x, _ in xp], g1)
                weights = [token_weights(m) for m in mid_d]
            batches = pruned_kept.pop("attn_in")
            attn_in_d, attn_in_p = torch.cat(dense_kept["attn_in"]), torch.cat(batches)
            if config.rearrange:
                blocks_plan[i] = _rearrange_attention(kind, attn_d, blocks_plan[i], attn_in_d, attn_in_p, batches,
                                                      targets, weights, g1, config.ridge)
                family.set_attention(bp, kind.slice(attn_d, blocks_plan[i]))
                attn_p = family.attention(bp)
                proj_p = kind.reweight_target(attn_p)
                fitted.append("channels")
            if config.logits:
                if kind.fit_logits(attn_d, attn_p, blocks_plan[i], attn_in_d, attn_in_p, config.ridge):
                    fitted.append("logits")
                else:
                    notes.add(f"{kind.name} attention: no logit fit (its scores are not q·k)")
            del attn_in_d, attn_in_p, batches
            _, kept = _run_block(bp, xp, lambda r: r.input_of("z", proj_p))
            _fit_layer(proj_p, kept["z"], targets, config.ridge, g1, weights)
            fitted.append("proj")
            del kept, targets, weights
        outs, kept = _run_block(bp, xp, lambda r: (r.input_of("h", fc2_p), r.output_of("fc2", fc2_p), r.input_of("u", fc1_p)))
        targets = dense_kept["fc2"]
        if g2 is not None:
            mid_p = [y - g2.to(device) * f for y, f in zip(outs, kept["fc2"])]
            mid_d = [y - g2.to(device) * f for y, f in zip(yd, dense_kept["fc2"])]
            targets = _stream_target(dense_kept["fc2"], mid_d, mid_p, g2)
        token_w = [token_weights(y) for y in yd] if g2 is not None else None
        hidden = kept["h"]
        if config.rearrange:
            units, full = _rearrange_mlp(bd, fc1_d, fc2_d, fc1_p, fc2_p, xd, kept["u"], targets, token_w, g2, config.ridge)
            hidden = [h[..., list(units)] for h in full]
            del full
            blocks_plan[i] = replace(blocks_plan[i], mlp=units)
            fitted.append("units")
        _fit_layer(fc2_p, hidden, targets, config.ridge, g2, token_w)
        fitted.append("fc2")
        del hidden
        del kept, targets
        yp_new, _ = _run_block(bp, xp)
        after = _relative_error(yp_new, yd)
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
    return CompensationResult(tuple(repairs), len(images), time.perf_counter() - started, tuple(sorted(notes)),
                              replace(plan, blocks=tuple(blocks_plan)))
