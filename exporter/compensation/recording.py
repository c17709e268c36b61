"""Running one block over the calibration batches and keeping what its layers saw: the inputs every fit reads."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from search.families import family_of


class _Stop(Exception):
    """Raised by the hook that captured the first block's input: the rest of the forward is not needed."""


def first_block_inputs(model: nn.Module, images: torch.Tensor, batch: int, device: torch.device) -> list[tuple[torch.Tensor, dict]]:
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


class Recorder:
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


def run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, dict]], record: Callable[[Recorder], None] | None = None
               ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The block's output on every batch, and what ``record`` asked to keep on the way."""
    recorder = Recorder()
    if record is not None:
        record(recorder)
    try:
        outputs = [block(x, **kwargs).detach() for x, kwargs in inputs]
    finally:
        recorder.remove()
    return outputs, recorder.kept


def relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    err = sum(float((o - t).double().pow(2).sum()) for o, t in zip(outputs, targets))
    return err / max(sum(float(t.double().pow(2).sum()) for t in targets), 1e-30)


def token_weights(stream: torch.Tensor) -> torch.Tensor:
    """One weight per token: 1 / its variance over channels in the dense stream.

    The stream is read through a LayerNorm (the next block's, or the final one), which divides every
    token by its own spread; DINOv2's streams carry a few tokens of norm far above the rest, and an
    unweighted fit spends itself on them while the normalised features the model ends with see them no more than others.
    """
    return 1.0 / stream.float().var(dim=-1).clamp_min(1e-6)


