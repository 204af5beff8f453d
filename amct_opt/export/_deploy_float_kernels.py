"""Quantized layers that ONNX Runtime cannot fuse into an integer kernel: float kernels, same numbers.

A quantized Conv whose output feeds a layer kept float (so it gets no output
QuantizeLinear), and every quantized ConvTranspose (ORT's CPU provider has no
integer kernel for it), would run as ``DQ(x), DQ(w) -> Conv``: the weight is
dequantized on every run and, not being a constant, misses ORT's pre-packed
convolution kernels, which makes such a model slower than the float one.

Here those layers get a constant float weight holding exactly the dequantized
int8 values, and read their quantized input through Div/Round/Clip/Mul (the
same arithmetic as QuantizeLinear -> DequantizeLinear, see :mod:`._fake_quant`,
which leaves values already on the grid unchanged): ORT then runs a fast float
kernel on the values the fake-quant model computes, and its WeightBiasQuantization pass, which requantizes
float-weight layers that read a DequantizeLinear, leaves them alone.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._graph import Graph
from ._qdq import QParams, add_simulated_qdq, dequantize_array, qparams

__all__ = ["float_kernels_for_unfused_layers"]


def _fused(graph: Graph, conv: onnx.NodeProto) -> bool:
    """True when ``conv``'s output goes to one QuantizeLinear, directly or through one Relu/Clip."""
    tensor = conv.output[0]
    for _ in range(2):
        readers = graph.consumers(tensor)
        if graph.is_output(tensor) or len(readers) != 1:
            return False
        if readers[0].op_type == "QuantizeLinear":
            return True
        if readers[0].op_type not in ("Relu", "Clip"):
            return False
        tensor = readers[0].output[0]
    return False


def _dequantized_constant(graph: Graph, name: str) -> np.ndarray | None:
    """The float value of ``DequantizeLinear(int8 initializer)`` producing ``name``, computed as ORT does."""
    dq = graph.producer(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    values, qp = graph.array(dq.input[0]), qparams(graph, dq)
    if values is None or qp is None or values.dtype != np.int8:
        return None
    return dequantize_array(values, qp)


def _simulated_input(graph: Graph, dq: onnx.NodeProto, qp: QParams, hint: str) -> str:
    """``dq``'s output read through :func:`add_simulated_qdq`.

    That output is already on the quantization grid, so this returns it unchanged,
    bit for bit (``k * scale / scale`` rounds back to ``k``); it only keeps ORT from
    seeing a DequantizeLinear in front of a float-weight layer.  Reading ``dq``
    (rather than the quantizer's input) keeps that quantizer, which may be the
    output quantizer of a fused convolution upstream.
    """
    out = graph.fresh(f"{hint}_input_fq")
    add_simulated_qdq(graph, dq.output[0], out, qp, f"{hint}_input")
    return out


def _activation_dq(graph: Graph, name: str) -> tuple[onnx.NodeProto, QParams] | None:
    dq = graph.producer(name)
    if dq is None or dq.op_type != "DequantizeLinear" or graph.array(dq.input[0]) is not None:
        return None
    q = graph.producer(dq.input[0])
    qp = qparams(graph, dq)
    if q is None or q.op_type != "QuantizeLinear" or qp is None or not qp.per_tensor:
        return None
    return dq, qp


def float_kernels_for_unfused_layers(graph: Graph) -> list[str]:
    """Give every quantized Conv without an output quantizer, and every quantized ConvTranspose,
    a constant dequantized weight and a Div/Round/Clip/Mul input quantizer (same values).

    Returns the output tensors of the layers so changed (ORT runs them with float kernels).
    """
    changed: list[str] = []
    for node in list(graph.nodes):
        if node.op_type == "Conv" and _fused(graph, node):
            continue
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
            continue
        weight = _dequantized_constant(graph, node.input[1])
        activation = _activation_dq(graph, node.input[0])
        if weight is None or activation is None:
            continue
        hint = node.name or node.output[0]
        weight_dq = graph.producer(node.input[1])
        assert weight_dq is not None
        graph.set_input(node, 1, graph.add_initializer(weight, f"{weight_dq.input[0]}_dequantized"))
        graph.set_input(node, 0, _simulated_input(graph, *activation, hint))
        changed.append(node.output[0])
    return changed
