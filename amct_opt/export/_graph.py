"""A small mutable view of an ONNX graph: producer/consumer lookups, edits, and write-back.

Only the top-level graph is edited; the exporter emits no subgraphs for the
layers amct_opt quantizes.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError

__all__ = ["Graph"]


class Graph:
    """Nodes and initializers of ``model.graph``; call :meth:`commit` to write edits back."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = [_copy(node) for node in graph.node]
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.input_names = {value.name for value in graph.input}
        self.output_names = {value.name for value in graph.output}
        self._taken = set(self.initializers) | self.input_names | self.output_names
        for node in self.nodes:
            self._taken.update(node.output)
            self._taken.add(node.name)
        self._producers: dict[str, onnx.NodeProto] | None = None
        self._consumers: dict[str, list[onnx.NodeProto]] | None = None

    # -- lookups -----------------------------------------------------------------------------

    def _index(self) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
        if self._producers is None or self._consumers is None:
            producers: dict[str, onnx.NodeProto] = {}
            consumers: dict[str, list[onnx.NodeProto]] = {}
            for node in self.nodes:
                for out in node.output:
                    producers[out] = node
                for name in dict.fromkeys(node.input):
                    consumers.setdefault(name, []).append(node)
            self._producers, self._consumers = producers, consumers
        return self._producers, self._consumers

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._index()[0].get(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return list(self._index()[1].get(name, ()))

    def array(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name``, or None if it is not a constant."""
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def is_output(self, name: str) -> bool:
        return name in self.output_names

    # -- edits -------------------------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        """A tensor or node name not used yet, derived from ``hint``."""
        name, i = hint, 0
        while name in self._taken:
            i += 1
            name = f"{hint}_{i}"
        self._taken.add(name)
        return name

    def add_initializer(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def add_node(
        self, op_type: str, inputs: list[str], outputs: list[str], hint: str, **attrs: Any
    ) -> onnx.NodeProto:
        node = helper.make_node(op_type, inputs, outputs, name=self.fresh(hint), **attrs)
        self.nodes.append(node)
        self._invalidate()
        return node

    def remove(self, node: onnx.NodeProto) -> None:
        self.nodes = [n for n in self.nodes if n is not node]
        self._invalidate()

    def replace_uses(self, old: str, new: str) -> None:
        """Make every node that reads ``old`` read ``new`` (graph outputs are not touched)."""
        for node in self.consumers(old):
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        self._invalidate()

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        node.input[index] = name
        self._invalidate()

    def rename_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        node.output[index] = name
        self._invalidate()

    def bypass(self, node: onnx.NodeProto) -> str:
        """Remove a one-input, one-output node whose output equals its input.

        Returns the name the input value now has: the node's output name when the
        output is a graph output (its producer is renamed), else the input name.
        Where renaming is impossible the node is turned into an Identity instead.
        """
        src, dst = node.input[0], node.output[0]
        if not self.is_output(dst):
            self.remove(node)
            self.replace_uses(dst, src)
            return src
        producer = self.producer(src)
        if producer is None or self.is_output(src) or len(self.consumers(src)) != 1:
            node.op_type, node.domain = "Identity", ""
            del node.attribute[:]
            self._invalidate()
            return src
        self.remove(node)
        self.rename_output(producer, list(producer.output).index(src), dst)
        return dst

    def _invalidate(self) -> None:
        self._producers = self._consumers = None

    # -- write-back --------------------------------------------------------------------------

    def commit(self) -> None:
        """Write the nodes (topologically sorted) and the used initializers back into the model."""
        graph = self.model.graph
        nodes = _toposort(self.nodes, self.input_names | set(self.initializers))
        used = {name for node in nodes for name in node.input} | self.output_names
        initializers = [t for name, t in self.initializers.items() if name in used]
        live = used | {out for node in nodes for out in node.output}
        value_info = [v for v in graph.value_info if v.name in live and v.name not in self.initializers]
        for field in ("node", "initializer", "value_info"):
            graph.ClearField(field)
        graph.node.extend(nodes)
        graph.initializer.extend(initializers)
        graph.value_info.extend(value_info)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, keeping the given order wherever the dependencies allow."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    deps = [
        {producer[name] for name in node.input if name and name not in available and name in producer}
        for node in nodes
    ]
    dependents: list[list[int]] = [[] for _ in nodes]
    for i, dep in enumerate(deps):
        for j in dep:
            dependents[j].append(i)
    pending = [len(dep) for dep in deps]
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            pending[j] -= 1
            if pending[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ExportError("the exported ONNX graph has a cycle")
    return [nodes[i] for i in order]
