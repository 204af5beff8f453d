"""The fake-quant model's quantizers, in a form ONNX Runtime computes exactly, in float.

A QuantizeLinear -> DequantizeLinear pair is what ORT's QDQ fusions look for.
On an activation next to a dequantized weight, ORT would run the layer with an
integer kernel, and on x86 CPUs without VNNI those kernels saturate int16 pair
sums (VPMADDUBSW).  On a weight alone, ORT (1.20 and later) folds the
QuantizeLinear and turns ``DequantizeLinear(int8 constant) -> MatMul`` into
MatMulNBits, which by default (``session.qdq_matmulnbits_accuracy_level`` 4)
quantizes the *activations* too: on all-MiniLM-L6-v2 that moved the embeddings'
cosine to the torch fake-quant model down to 0.994.  Either way the "simulation"
would drift from the torch fake-quant model.  Each pair, weight or activation,
is therefore written as the same arithmetic in plain float ops, which no fusion
touches::

    y = Clip(Round(x / scale), QMIN - zero_point, QMAX - zero_point) * scale

``Round`` is round-half-to-even and ``/`` a true division, as in QuantizeLinear,
and integers below 2**24 are exact in float32, so ``y`` equals
``DequantizeLinear(QuantizeLinear(x))`` bit for bit.  Weights keep their float
values and their per-channel scales (broadcast along the channel axis); ORT
constant-folds their quantizer into the float weight the torch model uses.
"""

from __future__ import annotations

import onnx

from ._graph import Graph
from ._qdq import add_simulated_qdq, qparams

__all__ = ["simulate_quantizers"]


def _pair(graph: Graph, q: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """The DequantizeLinear nodes reading quantizer ``q`` with its parameters (all its readers)."""
    if q.op_type != "QuantizeLinear":
        return None
    qp = qparams(graph, q)
    weight = graph.array(q.input[0])
    if qp is None or (not qp.per_tensor and weight is None):
        return None
    readers = graph.consumers(q.output[0])
    if graph.is_output(q.output[0]) or not readers:
        return None
    if any(r.op_type != "DequantizeLinear" or (rp := qparams(graph, r)) is None or not rp.same_as(qp) for r in readers):
        return None
    return readers


def simulate_quantizers(graph: Graph) -> None:
    """Replace every Q -> DQ pair, on an activation or a weight, by Div -> Round -> Clip -> Mul (same values)."""
    for q in [n for n in graph.nodes if n.op_type == "QuantizeLinear"]:
        dqs = _pair(graph, q)
        if dqs is None:
            continue
        qp = qparams(graph, q)
        assert qp is not None
        weight = graph.array(q.input[0])
        hint = q.name or ("weight" if weight is not None else "activation")
        keep, *rest = dqs
        graph.remove(q)
        for dq in dqs:
            graph.remove(dq)
        add_simulated_qdq(graph, q.input[0], keep.output[0], qp, hint, None if weight is None else weight.ndim)
        for dq in rest:
            if graph.is_output(dq.output[0]):
                graph.add_node("Identity", [keep.output[0]], [dq.output[0]], f"{hint}_Identity")
            else:
                graph.replace_uses(dq.output[0], keep.output[0])
