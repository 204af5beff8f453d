"""Removal of the ``amct_opt::LayerOutput`` markers left by the trace."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ._graph import Graph
from ._trace import MARKER_DOMAIN, MARKER_OP, OutputRange

__all__ = ["LayerOutput", "strip_markers"]


@dataclass(frozen=True)
class LayerOutput:
    """The output tensor of one call of a quantized layer, and its observed range (if any)."""

    layer: str
    tensor: str
    out_range: OutputRange | None
    #: The output requantizer ``(scale, zero_point)`` the torch layer simulates, if any.
    requant: tuple[float, int] | None = None


def strip_markers(graph: Graph) -> list[LayerOutput]:
    """Remove every marker node; return what they marked, named as in the edited graph."""
    found: list[tuple[str, OutputRange | None, tuple[float, int] | None, onnx.NodeProto]] = []
    for node in list(graph.nodes):
        if node.domain != MARKER_DOMAIN or node.op_type != MARKER_OP:
            continue
        attrs = {a.name: a for a in node.attribute}
        out_range = OutputRange(attrs["lo"].f, attrs["hi"].f) if "lo" in attrs and "hi" in attrs else None
        requant = None
        if "requant_scale" in attrs and "requant_zero_point" in attrs:
            requant = (attrs["requant_scale"].f, int(attrs["requant_zero_point"].i))
        found.append((attrs["layer"].s.decode(), out_range, requant, node))
    outputs = []
    for layer, out_range, requant, node in found:
        outputs.append(LayerOutput(layer, graph.bypass(node), out_range, requant))
    opsets = [o for o in graph.model.opset_import if o.domain != MARKER_DOMAIN]
    del graph.model.opset_import[:]
    graph.model.opset_import.extend(opsets)
    return outputs
