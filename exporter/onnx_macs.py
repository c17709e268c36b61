"""Count the multiply-accumulates of an ONNX graph, independently of the PyTorch-side counter.

The budget is checked against ``search``'s analytic MAC count; this module recounts from the
exported graph itself, so a surgery or export bug that leaves extra compute cannot hide. Only
MatMul, Gemm and Conv are counted (they are all but a few percent of a ViT's MACs), and a node
whose shapes stay unknown after inference is an error rather than a silent zero.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import onnx
from onnx import shape_inference

from search.core.errors import MacCountError

COUNTED_OPS = ("MatMul", "Gemm", "Conv")
_SUBGRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _fix_batch(model: onnx.ModelProto, batch: int) -> None:
    """Pin every symbolic leading input dim to ``batch`` and drop stale inferred shapes."""
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0 and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    # Shapes recorded at export carry the symbolic batch; left in place they would win the merge.
    del model.graph.value_info[:]
    for value in model.graph.output:
        value.type.tensor_type.ClearField("shape")


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Map tensor name to its dims (None where a dim is unknown), after shape inference."""
    shapes: dict[str, list[int | None]] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _shape(shapes: dict[str, list[int | None]], node: onnx.NodeProto, name: str) -> list[int]:
    dims = shapes.get(name)
    if dims is None:
        reason = f"tensor {name!r} has no inferred shape; export with static non-batch dims"
        raise MacCountError(node.name, node.op_type, reason, tensor=name)
    if any(d is None for d in dims):
        reason = f"tensor {name!r} has unknown dims {dims}; export with static non-batch dims"
        raise MacCountError(node.name, node.op_type, reason, tensor=name)
    return [int(d) for d in dims]


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int:
    out = _shape(shapes, node, node.output[0])
    a = _shape(shapes, node, node.input[0])
    if node.op_type == "MatMul":
        return math.prod(out) * a[-1]
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return out[0] * out[1] * k
    weight = _shape(shapes, node, node.input[1])  # (Cout, Cin/groups, *kernel)
    return math.prod(out) * math.prod(weight[1:])


def count_onnx_macs(path: Path, batch: int = 1) -> int:
    """MACs of one forward pass at ``batch``: sum over MatMul, Gemm and Conv nodes.

    MatMul: prod(output) * K; Gemm: M * N * K; Conv: prod(output) * Cin/groups * prod(kernel).

    Raises:
        MacCountError: a counted node's shape is unknown, or the graph has control flow
            (subgraphs), whose nodes could run any number of times.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    model = onnx.load(str(path))
    _fix_batch(model, batch)
    try:
        # data_prop folds Shape->Gather->Concat chains, so Reshape targets become concrete.
        inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except shape_inference.InferenceError as err:
        raise MacCountError(model.graph.name, "graph", f"shape inference failed: {err}") from err
    shapes = _known_shapes(inferred)
    total = 0
    for node in inferred.graph.node:
        if any(attr.type in _SUBGRAPH_ATTRS for attr in node.attribute):
            raise MacCountError(node.name, node.op_type, "control-flow subgraphs are not counted")
        if node.op_type in COUNTED_OPS:
            total += _node_macs(node, shapes)
    return total


def _walk(graph: onnx.GraphProto, counts: Counter[str]) -> None:
    for node in graph.node:
        counts[node.op_type] += 1
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _walk(sub, counts)


def count_ops(path: Path) -> dict[str, int]:
    """Histogram of node op types, most frequent first, including nodes inside subgraphs."""
    model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()
    _walk(model.graph, counts)
    return dict(counts.most_common())
