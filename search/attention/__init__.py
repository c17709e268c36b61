"""Attention kinds, one file per kind; see ``search.attention.base`` for what a kind owns.

Importing this package imports every kind module in it, and each registers itself, so a new kind
is a new file here and no other code changes. A kind that belongs to one model may live beside it
instead and register when that model's package is imported: FLatten's is ``search.models.flatten.kind``.
"""
from __future__ import annotations

import importlib
import pkgutil

from search.attention.base import (
    AttentionActivations,
    AttentionKind,
    AttentionShape,
    GateValues,
    HeadValues,
    HeadWeights,
    MeasurableKind,
    TokenLayout,
    get_kind,
    head_rows,
    kind_names,
    kind_of,
    measurable,
    register_kind,
    split_fused_qkv,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AttentionActivations", "AttentionKind", "AttentionShape", "GateValues", "HeadValues", "HeadWeights", "MeasurableKind",
    "TokenLayout", "get_kind", "head_rows", "kind_names", "kind_of", "measurable", "register_kind", "split_fused_qkv",
]
