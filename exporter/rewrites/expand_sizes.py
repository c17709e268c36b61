"""Give ``Expand`` nodes a size that shape inference can read, so token counts stay static.

``token.expand(x.shape[0], -1, -1)`` (the class token, register tokens, an attention pool's
latent query) is exported by torch as ``Expand(token, Where(Equal(size, -1), 1, size))`` with
``size = Concat(batch, -1, -1)``: ``-1`` means "keep this dim", and ONNX's Expand broadcasts a
1 the same way. ONNX shape inference propagates sizes through Shape, Gather, Unsqueeze and
Concat, but not through Equal and Where, so the expanded token's middle dim is unknown. Where
the class token is concatenated and then added to a position embedding of static length
(classic ViT), the Add's broadcast restores the token count; where it is concatenated after the
position embedding (DeiT-III, register tokens, FlexiViT: ``no_embed_class``), the count stays
unknown through every block, and nothing downstream (onnxsim's folding, the graph MAC count,
ONNX Runtime's fusions) sees a static sequence length.

The rewrite evaluates the Where where it can be evaluated exactly: every part of ``size`` is
either a constant (its -1 entries become 1, as the Where would make them) or a dim read from a
``Shape`` (never -1, so the Where keeps it). The Expand then reads ``Concat(batch, 1, 1)``
directly, and only the batch stays symbolic. Any other size is left as it is.

          Concat(batch, -1, -1) ──┬─────────────┐
                 Equal(·, -1) ── Where(·, 1, ·) ── Expand(token, ·)

becomes

          Concat(batch, 1, 1) ── Expand(token, ·)
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from exporter.rewrites.graph import (
    GraphView,
    add_initializer,
    attribute,
    remove_dead_nodes,
    topological_sort,
    unique_name,
)

# Ops that pass a dim read from Shape through unchanged in value (and so never make it -1).
_SIZE_PRESERVING = ("Unsqueeze", "Squeeze", "Reshape", "Gather", "Slice", "Cast", "Identity")


def _is_size(view: GraphView, name: str, depth: int = 0) -> bool:
    """True when tensor ``name`` only holds dims read from a ``Shape`` node (so none is negative)."""
    node = view.producer.get(name)
    if node is None or depth > 8:
        return False
    if node.op_type == "Shape":
        return True
    if node.op_type == "Concat":
        return all(_is_size(view, part, depth + 1) for part in node.input)
    return node.op_type in _SIZE_PRESERVING and _is_size(view, node.input[0], depth + 1)


def _keep_marker(view: GraphView, where: onnx.NodeProto) -> str | None:
    """The ``size`` tensor of a ``Where(Equal(size, -1), 1, size)`` node, or None for any other Where."""
    equal = view.parent(where, 0, "Equal")
    if equal is None or len(where.input) != 3 or where.input[2] not in equal.input[:2]:
        return None
    size = where.input[2]
    marker = view.constant(equal.input[1] if equal.input[0] == size else equal.input[0])
    ones = view.constant(where.input[1])
    if marker is None or ones is None or marker.size == 0 or ones.size == 0:
        return None
    if not (np.all(marker == -1) and np.all(ones == 1)):
        return None
    return size


def _folded_size(model: onnx.ModelProto, view: GraphView, size: str) -> str | None:
    """A new tensor equal to the Where's result on ``size``, or None when it cannot be told exactly."""
    concat = view.producer.get(size)
    if concat is None or concat.op_type != "Concat" or attribute(concat, "axis", 0) != 0:
        return None
    parts = []
    for part in concat.input:
        value = view.constant(part)
        if value is not None:
            parts.append(add_initializer(model, f"{part}_kept", np.where(value == -1, 1, value).astype(value.dtype)))
        elif _is_size(view, part):
            parts.append(part)
        else:
            return None
    out = unique_name(model, f"{size}_expand")
    model.graph.node.append(helper.make_node("Concat", parts, [out], name=unique_name(model, f"{concat.name}_expand"), axis=0))
    return out


def fold_expand_sizes(model: onnx.ModelProto) -> int:
    """Rewrite every Expand whose size is torch's ``-1 means keep`` Where; returns how many were rewritten.

    The graph is changed in place; the Where and Equal nodes left unread are removed.
    """
    view = GraphView(model)
    rewritten = 0
    for node in list(model.graph.node):
        if node.op_type != "Expand" or len(node.input) != 2:
            continue
        where = view.parent(node, 1, "Where")
        size = _keep_marker(view, where) if where is not None else None
        folded = _folded_size(model, view, size) if size is not None else None
        if folded is None:
            continue
        node.input[1] = folded
        rewritten += 1
    if rewritten:
        remove_dead_nodes(model)
        del model.graph.value_info[:]  # shapes recorded before the rewrite may be stale
        topological_sort(model)  # the new Concats were appended at the end
    return rewritten
