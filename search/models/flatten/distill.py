"""Block-wise distillation of FLatten DINOv2-S's new parameters (``python -m search.models.flatten.train``).

Every linear block is trained on its own, on the dense teacher's input to that block (the
teacher's residual stream), so that its attention branch ``ls1(attn(norm1(x)))``, what the block
adds to the residual stream, matches the dense block's. The loss is the MSE relative to the teacher
branch's mean square. The branch is taken after LayerScale so that channels count by how much they
reach the residual stream. Block-wise means no block sees another student block's error: the blocks
are independent (they could run in parallel, and each block's result does not depend on which other
blocks are linear), and nothing accumulates. The images are Fashion-MNIST *train* images; the test
split is the quality bench's evaluation set and is never read here. Only the new parameters train
(``search.models.flatten.dinov2.new_parameter_names``); the pretrained weights stay frozen.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import timm.data
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search.core.progress import progress_bar
from search.images.fashion_mnist import idx_paths, read_idx, select_indices
from search.models.flatten.attention import FocusedLinearAttention
from search.models.flatten.dinov2 import NEW_PARAMETERS, new_parameters_state

@dataclass(frozen=True)
class DistillConfig:
    """How the new parameters are trained.

    Attributes:
        steps: optimiser steps per linear block.
        batch_size: images per step.
        lr: AdamW's peak learning rate. Measured on DINOv2-S at 224 px (blocks 0, 3, 5; 150 steps;
            held-out relative MSE): 1e-3 gives 0.11/0.33/0.53, 1e-2 0.053/0.22/0.25, 3e-2
            0.031/0.17/0.21, 1e-1 0.020/0.16/0.20; 3e-2 takes most of the gain at a step size
            that stays far from unstable.
        warmup_fraction: share of the steps with a linear warm-up; cosine decay to 0 after.
        weight_decay: AdamW's decay; 0 because the new parameters are an embedding, per-channel
            scales and a depthwise kernel, which timm's recipes do not decay.
        seed: seeds every block's batch order (block i uses seed and i), so the result is fixed.
        eval_batch_size: images per forward when the teacher is read and the errors measured.
        round_to: the dtype the trained values are rounded to before the "after" figures are
            measured and returned (the shipped file's dtype); None keeps float32.
        show_progress: draw a progress bar on stderr.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-2
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 32
    round_to: torch.dtype | None = torch.float16
    show_progress: bool = True


@dataclass(frozen=True)
class BlockSummary:
    """One linear block's attention-branch error relative to the teacher's mean square, held out.

    Attributes:
        block: the block index.
        before: relative MSE at the initialisation (plain focused linear attention).
        after: relative MSE with the trained (and rounded) new parameters.
        final_train_loss: mean training loss over the last tenth of the steps.
    """

    block: int
    before: float
    after: float
    final_train_loss: float


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_new_parameters` returns.

    Attributes:
        state: the trained new parameters (float32 values, rounded to ``round_to`` if set).
        blocks: per-block held-out errors, in block order.
        train_images: images the parameters were trained on.
        held_out_images: images the errors were measured on (not trained on).
        seconds: wall time of the whole routine, teacher passes included.
    """

    state: dict[str, torch.Tensor] = field(repr=False)
    blocks: tuple[BlockSummary, ...]
    train_images: int
    held_out_images: int
    seconds: float


@dataclass(frozen=True)
class BlockData:
    """The teacher's view of one block on a set of images, stored in fp16 to keep it in memory.

    Attributes:
        inputs: the attention's input, ``norm1`` of the residual stream, (images, tokens, dim).
        targets: the dense attention branch ``ls1(attn(norm1(x)))``, same shape.
    """

    inputs: torch.Tensor = field(repr=False)
    targets: torch.Tensor = field(repr=False)


class _Enough(Exception):
    """Raised by a hook once the last block of interest has run, to skip the rest of the model."""


@torch.no_grad()
def teacher_block_data(
    teacher: VisionTransformer, images: torch.Tensor, blocks: Sequence[int], batch_size: int = 32,
    show_progress: bool = False, title: str = "teacher",
) -> dict[int, BlockData]:
    """For each block in ``blocks``: the dense teacher's attention input and attention branch output.

    The teacher runs only up to the last block asked for. Values are computed in float32 and
    stored in fp16 (relative rounding error ~5e-4, far below the errors being measured).
    """
    blocks = sorted(set(blocks))
    n = len(images)
    tokens, dim = teacher.patch_embed.num_patches + teacher.num_prefix_tokens, teacher.embed_dim
    data = {i: BlockData(torch.empty(n, tokens, dim, dtype=torch.float16), torch.empty(n, tokens, dim, dtype=torch.float16))
            for i in blocks}
    rows: slice = slice(0, 0)

    def keep(tensor_of: str, i: int):
        def hook(_m: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
            getattr(data[i], tensor_of)[rows] = out.to(torch.float16)
        return hook

    def stop(_m: nn.Module, _inputs: tuple, _out: torch.Tensor) -> None:
        raise _Enough

    hooks = []
    for i in blocks:
        hooks.append(teacher.blocks[i].norm1.register_forward_hook(keep("inputs", i)))
        hooks.append(teacher.blocks[i].ls1.register_forward_hook(keep("targets", i)))
    hooks.append(teacher.blocks[blocks[-1]].register_forward_hook(stop))
    was_training = teacher.training
    teacher.eval()
    try:
        with progress_bar(title, math.ceil(n / batch_size), enabled=show_progress) as advance:
            for start in range(0, n, batch_size):
                rows = slice(start, min(start + batch_size, n))
                try:
                    teacher.forward_features(images[rows])
                except _Enough:
                    pass
                advance("")
    finally:
        for hook in hooks:
            hook.remove()
        teacher.train(was_training)
    return data


def _branch(block: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return block.ls1(block.attn(inputs.float()))


def relative_mse(block: nn.Module, data: BlockData, batch_size: int = 32) -> float:
    """Σ (student branch − teacher branch)² / Σ teacher branch², over every image of ``data``."""
    error, scale = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(data.inputs), batch_size):
            rows = slice(start, start + batch_size)
            target = data.targets[rows].float()
            error += float((_branch(block, data.inputs[rows]) - target).pow(2).sum())
            scale += float(target.pow(2).sum())
    return error / max(scale, 1e-30)


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@contextmanager
def _only_new_parameters_trainable(attn: FocusedLinearAttention) -> Iterator[list[nn.Parameter]]:
    """Freeze everything in ``attn`` but its new parameters for the duration; restore the flags after."""
    params = dict(attn.named_parameters())
    before = {name: p.requires_grad for name, p in params.items()}
    try:
        for name, p in params.items():
            p.requires_grad_(name in NEW_PARAMETERS)
        yield [params[name] for name in NEW_PARAMETERS]
    finally:
        for name, p in params.items():
            p.requires_grad_(before[name])


def _train_block(
    index: int, block: nn.Module, train: BlockData, config: DistillConfig, advance: Callable[[str], None]
) -> float:
    """Train one linear block's new parameters on its teacher data; the mean loss of the last tenth of steps."""
    gen = torch.Generator().manual_seed(config.seed * 1000 + index)
    n = len(train.inputs)
    warmup = max(1, round(config.warmup_fraction * config.steps))
    tail = max(1, config.steps // 10)
    losses: list[float] = []
    with _only_new_parameters_trainable(block.attn) as params:
        optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _schedule(s, config.steps, warmup))
        order = torch.randperm(n, generator=gen)
        cursor = 0
        for step in range(config.steps):
            if cursor + config.batch_size > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            rows = order[cursor: cursor + config.batch_size]
            cursor += config.batch_size
            target = train.targets[rows].float()
            loss = F.mse_loss(_branch(block, train.inputs[rows]), target) / target.pow(2).mean().clamp_min(1e-30)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            sched.step()
            losses.append(float(loss.detach()))
            advance(f"block {index} loss {losses[-1]:.4f}")
    if config.round_to is not None:
        with torch.no_grad():
            for name in NEW_PARAMETERS:
                p = block.attn.get_parameter(name)
                p.copy_(p.to(config.round_to).to(p.dtype))
    return float(np.mean(losses[-tail:]))


def train_new_parameters(
    teacher: VisionTransformer,
    student: VisionTransformer,
    train_images: torch.Tensor,
    held_out_images: torch.Tensor,
    config: DistillConfig = DistillConfig(),
) -> TrainResult:
    """Train the new parameters of ``student``'s linear blocks by block-wise distillation from ``teacher``.

    ``student`` is ``teacher`` converted by :func:`convert_to_flatten`. For every linear block i,
    the teacher's attention input of block i and its attention branch output are computed once
    for all images; block i of the student is then trained alone on them (AdamW, warm-up and
    cosine decay, loss = MSE relative to the teacher branch's mean square), with everything but
    its new parameters frozen. The student is trained in place. Errors before and after are
    measured on ``held_out_images``, which are never trained on.

    Args:
        teacher: the dense model, frozen.
        student: the converted model whose new parameters are trained.
        train_images: preprocessed images (N, 3, H, W) to train on.
        held_out_images: preprocessed images to measure the errors on.
        config: steps, batch, learning rate, seed.

    Raises:
        ValueError: the student has no focused linear attention block, or the two models differ in depth.
    """
    start = time.perf_counter()
    if len(teacher.blocks) != len(student.blocks):
        raise ValueError("the student is not the teacher converted: the depths differ")
    blocks = [i for i, b in enumerate(student.blocks) if isinstance(b.attn, FocusedLinearAttention)]
    if not blocks:
        raise ValueError("the student has no focused linear attention block; nothing to train")
    if len(train_images) < config.batch_size:
        raise ValueError(f"{len(train_images)} training images are fewer than one batch of {config.batch_size}")
    bs, show = config.eval_batch_size, config.show_progress
    train = teacher_block_data(teacher, train_images, blocks, bs, show, "teacher (train images)")
    held = teacher_block_data(teacher, held_out_images, blocks, bs, show, "teacher (held-out images)")
    student.eval()  # no dropout in the blocks; the new parameters still get gradients
    summaries = []
    with progress_bar("block-wise distillation", config.steps * len(blocks), enabled=show) as advance:
        for i in blocks:
            block = student.blocks[i]
            before = relative_mse(block, held[i], bs)
            final_loss = _train_block(i, block, train[i], config, advance)
            summaries.append(BlockSummary(i, before, relative_mse(block, held[i], bs), final_loss))
    return TrainResult(
        new_parameters_state(student), tuple(summaries), len(train_images), len(held_out_images),
        time.perf_counter() - start,
    )


def fashion_mnist_train_images(
    data_config: dict[str, Any], train_per_class: int, held_out_per_class: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Class-balanced Fashion-MNIST *train*-split images, preprocessed like ``--data`` images.

    Picks ``train_per_class + held_out_per_class`` images of each class with
    :func:`search.images.fashion_mnist.select_indices` (seeded), splits each class's picks at random
    into the two sets, and applies the model's timm evaluation transform to the RGB images.

    Returns:
        (train images, held-out images, their indices in the train IDX file, in that order).
    """
    from PIL import Image

    images, labels = read_idx(*idx_paths("train"))
    chosen = select_indices(labels, train_per_class + held_out_per_class, seed)
    rng = np.random.default_rng(seed + 1)
    train_idx: list[int] = []
    held_idx: list[int] = []
    for label in sorted(chosen):
        picks = rng.permutation(chosen[label])
        train_idx += sorted(int(i) for i in picks[:train_per_class])
        held_idx += sorted(int(i) for i in picks[train_per_class:])
    cfg = {k: data_config[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct") if k in data_config}
    cfg["input_size"] = tuple(cfg["input_size"])
    transform = timm.data.create_transform(**cfg, is_training=False)

    def stack(indices: list[int]) -> torch.Tensor:
        return torch.stack([transform(Image.fromarray(images[i]).convert("RGB")) for i in indices])

    return stack(train_idx), stack(held_idx), train_idx, held_idx


@torch.no_grad()
def class_token_cosine(a: nn.Module, b: nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Mean cosine between the two models' final class tokens (what k-NN reads)."""
    cos = [F.cosine_similarity(a(images[s:s + batch_size]), b(images[s:s + batch_size]), dim=-1)
           for s in range(0, len(images), batch_size)]
    return float(torch.cat(cos).mean())
