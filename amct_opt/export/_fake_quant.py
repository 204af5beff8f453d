"""The fake-quant model's activation quantizers, in a form ONNX Runtime computes exactly.

A QuantizeLinear -> DequantizeLinear pair on an activation, next to a
dequantized weight, is what ORT's QDQ fusions look for: ORT would run the
layer with an integer kernel, and on x86 CPUs without VNNI those kernels
saturate int16 pair sums (VPMADDUBSW), so the "simulation" would drift from the
torch fake-quant model.  Each activation pair is therefore written as the same
arithmetic in plain float ops, which no fusion touches::

    y = Clip(Round(x / scale), QMIN - zero_point, QMAX - zero_point) * scale

``Round`` is round-half-to-even and ``/`` a true division, as in QuantizeLinear,
and integers below 2**24 are exact in float32, so ``y`` equals
``DequantizeLinear(QuantizeLinear(x))`` bit for bit.  Weight quantizers stay
QuantizeLinear -> DequantizeLinear on the float weight (per-channel axis kept):
without a dequantized activation ORT has nothing to fuse them with and computes
the dequantized weight in float.
"""

from __future__ import annotations

import onnx

from ._graph import Graph
from ._qdq import add_simulated_qdq, qparams

__all__ = ["simulate_activation_quantizers"]


def _pair(graph: Graph, q: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """The DequantizeLinear nodes reading per-tensor activation quantizer ``q`` with its parameters."""
    if q.op_type != "QuantizeLinear" or graph.array(q.input[0]) is not None:
        return None
    qp = qparams(graph, q)
    if qp is None or not qp.per_tensor:
        return None
    readers = graph.consumers(q.output[0])
    if graph.is_output(q.output[0]) or not readers:
        return None
    if any(r.op_type != "DequantizeLinear" or (rp := qparams(graph, r)) is None or not rp.same_as(qp) for r in readers):
        return None
    return readers


def simulate_activation_quantizers(graph: Graph) -> None:
    """Replace every activation Q -> DQ pair by Div -> Round -> Clip -> Mul (same values)."""
    for q in [n for n in graph.nodes if n.op_type == "QuantizeLinear"]:
        dqs = _pair(graph, q)
        if dqs is None:
            continue
        qp = qparams(graph, q)
        assert qp is not None
        hint = q.name or "activation"
        keep, *rest = dqs
        graph.remove(q)
        for dq in dqs:
            graph.remove(dq)
        add_simulated_qdq(graph, q.input[0], keep.output[0], qp, hint)
        for dq in rest:
            if graph.is_output(dq.output[0]):
                graph.add_node("Identity", [keep.output[0]], [dq.output[0]], f"{hint}_Identity")
            else:
                graph.replace_uses(dq.output[0], keep.output[0])
