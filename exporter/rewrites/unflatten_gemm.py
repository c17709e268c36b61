"""Undo onnxsim's Reshape-Gemm-Reshape around token-wise linears: MatMul on 3-D tokens, then Add.

onnxsim turns ``MatMul + Add(bias)`` on (B, N, C) tokens into a 2-D Gemm between two Reshapes.
The Gemm carries the bias, so ORT's fusions that want a visible bias Add (BiasGelu after fc1,
SkipLayerNormalization with bias after proj and fc2) cannot fire, and every linear costs two
Reshape nodes. This rewrite restores the 3-D form; the arithmetic is the same.

            X (B, N, C)
            |
        Reshape (-1, C)
            |
        Gemm(W, b)         transA=0, alpha=beta=1; W is (C, F), or (F, C) with transB=1
            |
        Reshape (-1|0, N, F)           or (-1|0, N, ...) with the trailing dims multiplying to F

becomes

    X -> [Reshape (-1, N, C)] -> MatMul(W (C, F)) -> [Add(b)] -> [Reshape (-1|0, N, ...)]

The leading Reshape stays (with the 3-D target) unless shape inference shows X is already
(B, N, C): the input of ``proj`` is (B, N, H, dv), flattened by that Reshape.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from exporter.rewrites.graph import GraphView, add_initializer, attribute, remove_dead_nodes, topological_sort, unique_name


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Dims of every tensor onnx's shape inference can tell (None where a dim is symbolic)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def _rewrite_one(model: onnx.ModelProto, view: GraphView, gemm: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> bool:
    flat = view.parent(gemm, 0, "Reshape")
    unflat = view.only_child(gemm.output[0], "Reshape")
    if flat is None or unflat is None or len(gemm.input) < 2:
        return False
    if attribute(gemm, "transA", 0) or attribute(gemm, "alpha", 1.0) != 1.0 or attribute(gemm, "beta", 1.0) != 1.0:
        return False
    flat_shape, out_shape = view.constant(flat.input[1]), view.constant(unflat.input[1])
    weight = view.constant(gemm.input[1])
    if flat_shape is None or out_shape is None or weight is None or weight.ndim != 2:
        return False
    if attribute(gemm, "transB", 0):
        weight = weight.T
    c, f = weight.shape
    if list(flat_shape) != [-1, c] or out_shape.size < 3 or out_shape[0] not in (-1, 0):
        return False
    if int(np.prod(out_shape[2:])) != f or min(out_shape[1:]) < 1:
        return False
    if len(view.consumers.get(flat.output[0], [])) != 1:
        return False
    has_bias = len(gemm.input) > 2 and bool(gemm.input[2])
    bias = view.constant(gemm.input[2]) if has_bias else None
    if has_bias and (bias is None or bias.size != f):
        return False

    stem = gemm.name or "gemm"
    tokens = int(out_shape[1])
    x = flat.input[0]
    if shapes.get(x, [])[1:] != [tokens, c]:
        flat.input[1] = add_initializer(model, f"{stem}/tokens_shape", np.array([-1, tokens, c], np.int64))
        x = flat.output[0]
    weight_name = gemm.input[1] if not attribute(gemm, "transB", 0) else add_initializer(model, f"{stem}.weight", weight)
    # A 3-D target is exactly the MatMul's output shape; a longer one (timm's (-1, N, 3, H, d))
    # stays as a Reshape after it.
    keep_unflat = out_shape.size > 3
    result = unique_name(model, f"{stem}/tokens") if keep_unflat else unflat.output[0]
    product = unique_name(model, f"{stem}/MatMul_output") if has_bias else result
    nodes = [helper.make_node("MatMul", [x, weight_name], [product], name=unique_name(model, f"{stem}/MatMul"))]
    if has_bias:
        bias_name = add_initializer(model, f"{stem}.bias", np.asarray(bias, dtype=np.float32).reshape(f))
        nodes.append(helper.make_node("Add", [product, bias_name], [result], name=unique_name(model, f"{stem}/Add")))
    if keep_unflat:
        unflat.input[0] = result
    else:
        model.graph.node.remove(unflat)
    model.graph.node.extend(nodes)
    return True


def unflatten_gemm(model: onnx.ModelProto) -> int:
    """Rewrite every matching Reshape-Gemm-Reshape in ``model`` in place; returns how many."""
    done = 0
    shapes = _inferred_shapes(model)
    while True:
        view = GraphView(model)
        changed = False
        for gemm in [n for n in model.graph.node if n.op_type == "Gemm"]:
            if _rewrite_one(model, view, gemm, shapes):
                done += 1
                changed = True
                break
        if not changed:
            break
        remove_dead_nodes(model)
    if done:
        del model.graph.value_info[:]  # shapes recorded before the rewrite may be stale
        topological_sort(model)
    return done
