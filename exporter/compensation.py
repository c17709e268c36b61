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
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from search.attention import kind_of
from search.budget.plan import Plan
from search.core.runtime import Runtime, on_device
from search.cut.least_squares import NormalEquations, load_fit, prior_of, ridge_solve
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
        batch: images per forward pass.
    """

    images: int = 256
    ridge: float = 0.1
    logits: bool = True
    stream: bool = True
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
    for i, (bd, bp) in enumerate(zip(dense_blocks, pruned_blocks)):
        attn_d, attn_p = family_of(dense).attention(bd), family.attention(bp)
        kind = kind_of(attn_p)
        has_heads = kind.shape(attn_p).num_heads > 0
        proj_d, proj_p = kind_of(attn_d).reweight_target(attn_d), kind.reweight_target(attn_p) if has_heads else None
        fc2_d, fc2_p = family_of(dense).mlp_linears(bd)[1], family.mlp_linears(bp)[1]

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
        if has_heads and config.logits:
            if kind.fit_logits(attn_d, attn_p, plan.blocks[i], torch.cat(dense_kept["attn_in"]), torch.cat(pruned_kept["attn_in"]),
                               config.ridge):
                fitted.append("logits")
            else:
                notes.add(f"{kind.name} attention: no logit fit (its scores are not q·k)")
        del pruned_kept
        if has_heads and proj_p is not None:
            _, kept = _run_block(bp, xp, lambda r: r.input_of("z", proj_p))
            targets = dense_kept["proj"]
            if g1 is not None:
                mid_d = [x + g1.to(device) * p for (x, _), p in zip(xd, dense_kept["proj"])]
                targets = _stream_target([torch.zeros_like(p) for p in dense_kept["proj"]], mid_d, [x for x, _ in xp], g1)
            _fit_layer(proj_p, kept["z"], targets, config.ridge, g1, [token_weights(m) for m in mid_d] if g1 is not None else None)
            fitted.append("proj")
        outs, kept = _run_block(bp, xp, lambda r: (r.input_of("h", fc2_p), r.output_of("fc2", fc2_p)))
        targets = dense_kept["fc2"]
        if g2 is not None:
            mid_p = [y - g2.to(device) * f for y, f in zip(outs, kept["fc2"])]
            mid_d = [y - g2.to(device) * f for y, f in zip(yd, dense_kept["fc2"])]
            targets = _stream_target(dense_kept["fc2"], mid_d, mid_p, g2)
        _fit_layer(fc2_p, kept["h"], targets, config.ridge, g2, [token_weights(y) for y in yd] if g2 is not None else None)
        fitted.append("fc2")
        del kept, targets
        yp_new, _ = _run_block(bp, xp)
        after = _relative_error(yp_new, yd)
        reverted = after > before
        if reverted:
            bp.load_state_dict(saved)
            yp_new, after = yp, before
        repairs.append(BlockRepair(i, before, after, tuple(fitted), target, reverted))
        if on_block is not None:
            on_block(f"block {i}: error {before:.4f} → {after:.4f}")
        xd = [(y, kwargs) for y, (_, kwargs) in zip(yd, xd)]
        xp = [(y, kwargs) for y, (_, kwargs) in zip(yp_new, xp)]
    return CompensationResult(tuple(repairs), len(images), time.perf_counter() - started, tuple(sorted(notes)))
