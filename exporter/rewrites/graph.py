"""A read-mostly view of an ONNX graph for pattern rewrites: who produces and who consumes a tensor.

Rewrites match a subgraph by walking producer/consumer links from an anchor node, check that
every intermediate tensor is private to the match (no consumer outside it), then add the fused
node and leave the matched nodes to :func:`remove_dead_nodes`. Constants may be initializers or
``Constant`` nodes; :meth:`GraphView.constant` reads both.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

MS_DOMAIN = "com.microsoft"


class GraphView:
    """Producer and consumer maps of ``model.graph``; rebuild after changing the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph_outputs = {out.name for out in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of tensor ``name`` when it is an initializer or a Constant node's output."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def parent(self, node: onnx.NodeProto, index: int, op_type: str) -> onnx.NodeProto | None:
        """The node producing input ``index`` of ``node``, if it exists and has ``op_type``."""
        if index >= len(node.input):
            return None
        parent = self.producer.get(node.input[index])
        return parent if parent is not None and parent.op_type == op_type else None

    def only_child(self, name: str, op_type: str | None = None) -> onnx.NodeProto | None:
        """The single consumer of tensor ``name`` (of ``op_type`` if given), if it has exactly one."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.graph_outputs:
            return None
        return users[0] if op_type is None or users[0].op_type == op_type else None

    def private(self, nodes: list[onnx.NodeProto], keep: set[str]) -> bool:
        """True when every output of ``nodes`` except those in ``keep`` is used only inside ``nodes``."""
        inside = {id(n) for n in nodes}
        for node in nodes:
            for name in node.output:
                if name in keep:
                    continue
                if name in self.graph_outputs:
                    return False
                if any(id(user) not in inside for user in self.consumers.get(name, [])):
                    return False
        return True


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of attribute ``name`` of ``node``, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def unique_name(model: onnx.ModelProto, stem: str) -> str:
    """A tensor/node name not yet used in ``model``, derived from ``stem``."""
    used = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        used.update(node.output)
        used.add(node.name)
    name, i = stem, 0
    while name in used:
        i += 1
        name = f"{stem}_{i}"
    return name


def add_initializer(model: onnx.ModelProto, stem: str, value: np.ndarray) -> str:
    """Add ``value`` as a new initializer and return its name."""
    name = unique_name(model, stem)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return name


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nobody reads, then unused initializers; returns nodes removed."""
    graph = model.graph
    removed = 0
    while True:
        needed = {out.name for out in graph.output}
        for node in graph.node:
            needed.update(node.input)
        dead = [n for n in graph.node if not any(o in needed for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return removed


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Import ``domain`` at ``version`` unless it is already imported."""
    if not any(op.domain == domain for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder nodes so every node follows the producers of its inputs (ONNX requires it)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
