"""Fuse the self-attention that torch exports for timm and PrunedAttention into com.microsoft.Attention.

ORT's transformers optimizer looks for BERT's attention (separate q/k/v MatMuls and a mask) and
does not match this graph, so we match it ourselves. The subgraph, as the TorchScript exporter
and onnxsim leave it (optional nodes in brackets; the qkv projection comes in any of three forms):

            X (B, N, C)
            |
    [Reshape (-1, C)] -> Gemm(W, b) -> Reshape (-1, N, Wq+Wk+Wv)
      or    MatMul(W) -> [Add(b)]
            |
          Split (axis -1: Wq, Wk, Wv)
       /          |                \\
    Reshape     Reshape          Reshape         (-1, N, H, dqk) (-1, N, H, dqk) (-1, N, H, dv)
      |           |                |
    Transpose   Transpose        Transpose        q: (0,2,1,3)  k: (0,2,3,1)  v: (0,2,1,3)
      |           |   or Transpose(0,2,1,3) -> Transpose(0,1,3,2)
    [Mul cq]    [Mul ck]           |
        \\       /                  |
         MatMul                    |
           |                       |
       [Mul cs | Div cs]           |
           |                       |
        Softmax (axis -1)          |
             \\                    /
                   MatMul
                     |
               Transpose (0,2,1,3)
                     |
               Reshape (-1, N, H*dv)  or (-1, H*dv)

becomes

    X -> Attention(W, b; num_heads=H, qkv_hidden_sizes=[Wq, Wk, Wv], scale=cq*ck*cs) -> (B, N, H*dv)
         [-> Reshape (-1, H*dv) when the original output was 2-D]

``qkv_hidden_sizes`` lets q/k and v have different widths, which a pruned block has. The scale is
the product of the constants the graph multiplies by, so a dense scale kept after pruning q/k
(see ``search.attention.softmax``) survives the fusion.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from exporter.rewrites.graph import (
    MS_DOMAIN,
    GraphView,
    add_initializer,
    attribute,
    ensure_opset,
    remove_dead_nodes,
    topological_sort,
    unique_name,
)


@dataclass(frozen=True)
class _Projection:
    """The fused qkv projection feeding the Split: its input X, weight (C, total), bias, nodes."""

    x: str
    weight: np.ndarray
    bias: np.ndarray | None
    nodes: tuple[onnx.NodeProto, ...]


def _scalar(view: GraphView, node: onnx.NodeProto) -> tuple[str, float] | None:
    """For Mul/Div by a one-element constant: (the other input, the constant)."""
    for i in (1, 0) if node.op_type == "Mul" else (1,):
        value = view.constant(node.input[i])
        if value is not None and value.size == 1:
            return node.input[1 - i], float(value.reshape(()))
    return None


def _through_scale(view: GraphView, name: str) -> tuple[str, float, list[onnx.NodeProto]]:
    """Step back over an optional Mul/Div by a scalar: (the tensor before it, factor, nodes)."""
    node = view.producer.get(name)
    if node is not None and node.op_type in ("Mul", "Div"):
        found = _scalar(view, node)
        if found is not None:
            source, value = found
            factor = value if node.op_type == "Mul" else 1.0 / value
            return source, factor, [node]
    return name, 1.0, []


@dataclass(frozen=True)
class _Branch:
    """One of q, k, v walked back to where it leaves the shared qkv tensor.

    ``tail`` is the head Reshape (-1, N, H, d) fed by a Split output (split-then-reshape, as in
    PrunedAttention), or a Squeeze(axis 0) of a Split output (reshape-then-split, timm's layout).
    """

    nodes: tuple[onnx.NodeProto, ...]
    tail: onnx.NodeProto


# (Transpose perms walking back from the attention MatMul, the op the walk must end on).
_Q_V_PERMS = ((((0, 2, 1, 3),), "Reshape"), ((), "Squeeze"))
_K_PERMS = ((((0, 2, 3, 1),), "Reshape"), (((0, 1, 3, 2), (0, 2, 1, 3)), "Reshape"), (((0, 1, 3, 2),), "Squeeze"))


def _branch(view: GraphView, name: str, options: tuple[tuple[tuple[tuple[int, ...], ...], str], ...]) -> _Branch | None:
    """Walk back from ``name`` over Transposes with one of the ``options`` perms to its tail op."""
    for perms, tail in options:
        nodes: list[onnx.NodeProto] = []
        node = view.producer.get(name)
        for perm in perms:
            if node is None or node.op_type != "Transpose" or tuple(attribute(node, "perm", ())) != perm:
                break
            nodes.append(node)
            node = view.producer.get(node.input[0])
        else:
            if node is None or node.op_type != tail:
                continue
            if tail == "Reshape":
                shape = view.constant(node.input[1])
                if shape is not None and shape.size == 4 and shape[0] in (-1, 0) and min(shape[1:]) >= 1:
                    return _Branch((*nodes, node), node)
            else:
                axes = view.constant(node.input[1]) if len(node.input) > 1 else attribute(node, "axes")
                if axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] == [0]:
                    return _Branch((*nodes, node), node)
    return None


def _split_sizes(view: GraphView, split: onnx.NodeProto) -> list[int] | None:
    sizes = view.constant(split.input[1]) if len(split.input) > 1 and split.input[1] else attribute(split, "split")
    return None if sizes is None else [int(s) for s in np.asarray(sizes).reshape(-1)]


@dataclass(frozen=True)
class _Heads:
    """Where q, k, v come from: the qkv tensor, head count and widths, and the nodes in between."""

    qkv: str
    heads: int
    dqk: int
    dv: int
    nodes: tuple[onnx.NodeProto, ...]


def _heads(view: GraphView, q: _Branch, k: _Branch, v: _Branch) -> _Heads | None:
    """Check that q, k, v are the three parts of one Split and read H, dqk, dv."""
    tails = (q.tail, k.tail, v.tail)
    split = view.producer.get(q.tail.input[0])
    if split is None or split.op_type != "Split" or len(split.output) != 3:
        return None
    if list(split.output) != [t.input[0] for t in tails]:
        return None
    sizes = _split_sizes(view, split)
    if all(t.op_type == "Reshape" for t in tails):
        shapes = [view.constant(t.input[1]) for t in tails]
        heads, dqk, dv = int(shapes[0][2]), int(shapes[0][3]), int(shapes[2][3])
        if int(shapes[1][2]) != heads or int(shapes[1][3]) != dqk or int(shapes[2][2]) != heads:
            return None
        if attribute(split, "axis", 0) not in (-1, 2) or sizes != [heads * dqk, heads * dqk, heads * dv]:
            return None
        return _Heads(split.input[0], heads, dqk, dv, (split,))
    if all(t.op_type == "Squeeze" for t in tails):
        spread = view.parent(split, 0, "Transpose")
        unfold = spread and view.parent(spread, 0, "Reshape")
        shape = unfold and view.constant(unfold.input[1])
        if spread is None or unfold is None or shape is None or shape.size != 5 or int(shape[2]) != 3:
            return None
        if tuple(attribute(spread, "perm", ())) != (2, 0, 3, 1, 4) or attribute(split, "axis", 0) != 0:
            return None
        if sizes not in (None, [1, 1, 1]):
            return None
        heads, d = int(shape[3]), int(shape[4])
        return _Heads(unfold.input[0], heads, d, d, (split, spread, unfold))
    return None


def _projection(view: GraphView, name: str) -> _Projection | None:
    """The qkv projection producing ``name``: Reshape-Gemm-Reshape, MatMul+Add or MatMul."""
    node = view.producer.get(name)
    if node is None:
        return None
    unflatten: tuple[onnx.NodeProto, ...] = ()
    if node.op_type == "Reshape" and view.parent(node, 0, "Gemm") is not None:
        unflatten, node = (node,), view.parent(node, 0, "Gemm")
    if node.op_type == "Gemm":
        flat = view.parent(node, 0, "Reshape")
        if flat is None or len(node.input) < 2:
            return None
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
            return None
        weight = view.constant(node.input[1])
        has_bias = len(node.input) > 2 and bool(node.input[2])
        bias = view.constant(node.input[2]) if has_bias else None
        if weight is None or (has_bias and bias is None):
            return None
        weight = weight.T if attribute(node, "transB", 0) else weight
        return _Projection(flat.input[0], weight, bias, (*unflatten, node, flat))
    bias = None
    nodes: tuple[onnx.NodeProto, ...] = ()
    if node.op_type == "Add":
        for i in (0, 1):
            matmul = view.parent(node, i, "MatMul")
            value = view.constant(node.input[1 - i])
            if matmul is not None and value is not None:
                bias, nodes, node = value, (node,), matmul
                break
        else:
            return None
    if node.op_type != "MatMul":
        return None
    weight = view.constant(node.input[1])
    if weight is None or weight.ndim != 2:
        return None
    return _Projection(node.input[0], weight, bias, (*nodes, node))


def _fuse_one(model: onnx.ModelProto, view: GraphView, softmax: onnx.NodeProto) -> bool:
    """Replace the attention around ``softmax`` if it matches; True when the graph changed."""
    if attribute(softmax, "axis", -1) not in (-1, 3):
        return False
    scores, cs, score_scale = _through_scale(view, softmax.input[0])
    qk = view.producer.get(scores)
    if qk is None or qk.op_type != "MatMul":
        return False
    q_in, cq, q_scale = _through_scale(view, qk.input[0])
    k_in, ck, k_scale = _through_scale(view, qk.input[1])
    q = _branch(view, q_in, _Q_V_PERMS)
    k = _branch(view, k_in, _K_PERMS)
    av = view.only_child(softmax.output[0], "MatMul")
    if q is None or k is None or av is None or av.input[0] != softmax.output[0]:
        return False
    v = _branch(view, av.input[1], _Q_V_PERMS)
    merge = view.only_child(av.output[0], "Transpose")
    out = merge and view.only_child(merge.output[0], "Reshape")
    if v is None or merge is None or out is None or tuple(attribute(merge, "perm", ())) != (0, 2, 1, 3):
        return False
    found = _heads(view, q, k, v)
    if found is None:
        return False
    heads, dqk, dv = found.heads, found.dqk, found.dv
    out_shape = view.constant(out.input[1])
    if out_shape is None or out_shape.size not in (2, 3) or int(out_shape[-1]) != heads * dv:
        return False
    proj = _projection(view, found.qkv)
    if proj is None or proj.weight.shape[1] != heads * (2 * dqk + dv):
        return False

    keep_out = out.output[0] if out_shape.size == 2 else None
    matched = [*proj.nodes, *found.nodes, *q.nodes, *k.nodes, *v.nodes, *q_scale, *k_scale, *score_scale, qk, softmax, av, merge]
    if keep_out is None:
        matched.append(out)
    if not view.private(matched, keep={out.output[0]} if keep_out is None else {merge.output[0]}):
        return False

    stem = softmax.name.rsplit("/", 1)[0] or "attention"
    weight = add_initializer(model, f"{stem}/Attention.weight", proj.weight.astype(np.float32))
    bias_value = proj.bias if proj.bias is not None else np.zeros(proj.weight.shape[1], np.float32)
    bias = add_initializer(model, f"{stem}/Attention.bias", bias_value.astype(np.float32).reshape(-1))
    result = out.output[0] if keep_out is None else unique_name(model, f"{stem}/Attention_output")
    fused = helper.make_node(
        "Attention",
        [proj.x, weight, bias],
        [result],
        name=unique_name(model, f"{stem}/Attention"),
        domain=MS_DOMAIN,
        num_heads=heads,
        qkv_hidden_sizes=[heads * dqk, heads * dqk, heads * dv],
        scale=float(cq * ck * cs),
    )
    model.graph.node.append(fused)
    if keep_out is not None:
        out.input[0] = result
    else:
        # The old Reshape wrote the same name; drop it now so the name has one producer.
        model.graph.node.remove(out)
    return True


def fuse_attention(model: onnx.ModelProto) -> int:
    """Fuse every matching attention in ``model`` in place; returns how many were fused."""
    fused = 0
    tried: set[str] = set()
    while True:
        view = GraphView(model)
        # One fusion per view: a fusion edits the graph, so the view is rebuilt before the next.
        pending = [n for n in model.graph.node if n.op_type == "Softmax" and n.output[0] not in tried]
        if not pending:
            break
        for softmax in pending:
            tried.add(softmax.output[0])
            if _fuse_one(model, view, softmax):
                fused += 1
                remove_dead_nodes(model)
                break
    if fused:
        del model.graph.value_info[:]  # shapes recorded before the rewrite may be stale
        ensure_opset(model, MS_DOMAIN, 1)
        topological_sort(model)
    return fused
