"""FLatten DeiT: timm VisionTransformers whose blocks use focused linear or softmax attention.

A pattern string picks the attention of each block: "L" for
:class:`search.models.flatten.attention.FocusedLinearAttention`, "S" for timm's softmax ``Attention``.
The default puts linear attention in the first half of the blocks (rounded up) and softmax in
the rest, e.g. "LLLLLLSSSSSS" for 12 blocks: early blocks see the most redundant, local token
mixing, where linear attention loses least.

Importing this module registers with timm:

- ``flatten_deit_t``, ``flatten_deit_s``, ``flatten_deit_b``: DeiT-T/S/B geometry
  (``deit_{tiny,small,base}_patch16_224``) and DeiT's preprocessing, so
  ``timm.data.resolve_data_config`` works. No public weights exist for them: ``pretrained=True``
  raises :class:`search.core.errors.WeightsError`; use random init or load a checkpoint.

They take ``pattern=`` and timm's usual kwargs (``img_size``, ``num_classes``, and also
``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` to build a tiny one for tests).
:func:`flatten_vit` does the same on top of any timm VisionTransformer.
"""
from __future__ import annotations

from typing import Any, Optional

import timm
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from torch import nn

from search.core.errors import WeightsError
from search.models.flatten.attention import FocusedLinearAttention
from search.models.registry import timm_model

LINEAR = "L"
SOFTMAX = "S"
ALPHABET = LINEAR + SOFTMAX

# Where timm's pretrained cfgs point at weights; FLatten models must not inherit the dense model's.
_WEIGHT_SOURCES = ("url", "file", "hf_hub_id", "hf_hub_filename", "state_dict")
# DeiT's preprocessing and head layout, the parts of its cfg that describe the architecture.
_ARCHITECTURE_FIELDS = (
    "num_classes", "input_size", "pool_size", "fixed_input_size", "interpolation", "crop_pct",
    "crop_mode", "mean", "std", "first_conv", "classifier", "license",
)
_DEIT_BASES = {
    "flatten_deit_t": "deit_tiny_patch16_224",
    "flatten_deit_s": "deit_small_patch16_224",
    "flatten_deit_b": "deit_base_patch16_224",
}


def default_pattern(depth: int) -> str:
    """Linear attention in the first half of ``depth`` blocks (rounded up), softmax after."""
    linear = (depth + 1) // 2
    return LINEAR * linear + SOFTMAX * (depth - linear)


def check_pattern(pattern: str, depth: int) -> str:
    """``pattern`` if it names one attention per block from the alphabet "LS"; ValueError if not."""
    if not isinstance(pattern, str) or len(pattern) != depth or set(pattern) - set(ALPHABET):
        raise ValueError(
            f"pattern {pattern!r} must be {depth} characters (one per block), each "
            f"'{LINEAR}' (focused linear attention) or '{SOFTMAX}' (softmax attention), "
            f"e.g. {default_pattern(depth)!r}"
        )
    return pattern


def _focused_like(attn: nn.Module, grid_size: tuple[int, int], num_prefix_tokens: int) -> FocusedLinearAttention:
    """A fresh FocusedLinearAttention with the widths and biases of timm's softmax ``attn``."""
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, part, nn.Identity()), nn.Identity):
            raise ValueError(
                f"the base model's attention has {part} normalisation, which focused linear attention "
                "has no place for; choose a ViT/DeiT without qk_norm or scale_attn_norm"
            )
    dim = attn.qkv.in_features
    linear = FocusedLinearAttention.dense(
        dim,
        attn.num_heads,
        grid_size,
        num_prefix_tokens,
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
    )
    linear.apply(init_weights_vit_timm)
    return linear.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)


def flatten_vit(base_timm_name: str, pattern: Optional[str] = None, **kwargs: Any) -> VisionTransformer:
    """timm's VisionTransformer ``base_timm_name`` with block i's attention chosen by ``pattern[i]``.

    Blocks marked "L" get a new :class:`FocusedLinearAttention` of the same width, heads and
    biases, initialised like timm initialises its Linear layers (scale and positional encoding at
    zero); blocks marked "S" keep timm's softmax attention. The model is built with random
    weights and its pretrained cfg keeps the base's preprocessing without its weight sources.

    Args:
        base_timm_name: a timm VisionTransformer architecture, e.g. "deit_tiny_patch16_224".
        pattern: one character per block from "LS"; None for :func:`default_pattern`.
        **kwargs: passed to ``timm.create_model`` (img_size, num_classes, depth, ...).

    Raises:
        ValueError: the pattern does not fit the depth, or the base is no fixed-size VisionTransformer.
    """
    kwargs.pop("pretrained", None)
    model = timm.create_model(base_timm_name, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{base_timm_name} builds a {type(model).__name__}, not a timm VisionTransformer")
    if model.dynamic_img_size:
        raise ValueError(
            "focused linear attention has a positional encoding and a DWC for one patch grid; "
            "build the base with dynamic_img_size=False"
        )
    depth = len(model.blocks)
    pattern = check_pattern(default_pattern(depth) if pattern is None else pattern, depth)
    grid = tuple(model.patch_embed.grid_size)
    for block, kind in zip(model.blocks, pattern):
        if kind == LINEAR:
            block.attn = _focused_like(block.attn, grid, model.num_prefix_tokens)
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in _WEIGHT_SOURCES}
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def _architecture_cfg(base_timm_name: str) -> dict[str, Any]:
    cfg = get_pretrained_cfg(base_timm_name)
    return {k: getattr(cfg, k) for k in _ARCHITECTURE_FIELDS}


# Read by timm's register_model: DeiT's preprocessing, no weights.
default_cfgs = generate_default_cfgs({name: _architecture_cfg(base) for name, base in _DEIT_BASES.items()})


def _create(name: str, pretrained: bool, pattern: Optional[str], **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise WeightsError(
            f"{name} has no public pretrained weights; create it with pretrained=False "
            "(random init) and load a checkpoint"
        )
    cfg = resolve_pretrained_cfg(
        name,
        pretrained_cfg=kwargs.pop("pretrained_cfg", None),
        pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None),
    )
    kwargs.pop("cache_dir", None)
    return flatten_vit(_DEIT_BASES[name], pattern, pretrained_cfg=cfg.to_dict(remove_source=True), **kwargs)


@timm_model(pattern=True)
@register_model
def flatten_deit_t(pretrained: bool = False, pattern: Optional[str] = None, **kwargs: Any) -> VisionTransformer:
    """FLatten DeiT-tiny: DeiT-T/16 at 224 px (width 192, 12 blocks, 3 heads)."""
    return _create("flatten_deit_t", pretrained, pattern, **kwargs)


@timm_model(pattern=True)
@register_model
def flatten_deit_s(pretrained: bool = False, pattern: Optional[str] = None, **kwargs: Any) -> VisionTransformer:
    """FLatten DeiT-small: DeiT-S/16 at 224 px (width 384, 12 blocks, 6 heads)."""
    return _create("flatten_deit_s", pretrained, pattern, **kwargs)


@timm_model(pattern=True)
@register_model
def flatten_deit_b(pretrained: bool = False, pattern: Optional[str] = None, **kwargs: Any) -> VisionTransformer:
    """FLatten DeiT-base: DeiT-B/16 at 224 px (width 768, 12 blocks, 12 heads)."""
    return _create("flatten_deit_b", pretrained, pattern, **kwargs)
