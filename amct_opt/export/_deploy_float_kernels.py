"""Quantized layers that ONNX Runtime cannot fuse into QLinearConv: an explicit integer or float kernel.

ORT's CPU provider fuses ``DQ(x), DQ(w) -> Conv`` into QLinearConv only when a
QuantizeLinear reads the Conv's output.  A quantized Conv whose output feeds a
layer kept float gets no output quantizer (that layer must see the float values
it sees in the fake-quant model), and ORT would run it as a float Conv on a
weight it dequantizes on every run, which misses its pre-packed kernels and is
slower than the float model.  Such a Conv is written here as
``ConvInteger(x_u8, w_s8) -> Cast -> Mul(scale_x * scale_w) -> Add(bias)``: an
integer kernel on the int8 weight initializer with int32 accumulation, whose
float output is the fake-quant Conv's up to float rounding, and no Q/DQ next to
the float layer.

ORT has no integer ConvTranspose kernel (nor, for a weight zero point other
than 0, a ConvInteger one): those layers get a constant float weight holding
exactly the dequantized int8 values, and read their quantized input through
Div/Round/Clip/Mul (the same arithmetic as QuantizeLinear -> DequantizeLinear,
see :mod:`._fake_quant`, which leaves values already on the grid unchanged): ORT
then runs a fast float kernel on the values the fake-quant model computes, and
its WeightBiasQuantization pass, which requantizes float-weight layers that read
a DequantizeLinear, leaves them alone.
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


def _integer_conv(graph: Graph, conv: onnx.NodeProto, dq: onnx.NodeProto, x_qp: QParams) -> bool:
    """Rewrite ``conv`` as ConvInteger -> Cast -> Mul -> (Add bias); False where ORT could not run it."""
    weight_dq = graph.producer(conv.input[1])
    if weight_dq is None or weight_dq.op_type != "DequantizeLinear":
        return False
    weight, w_qp = graph.array(weight_dq.input[0]), qparams(graph, weight_dq)
    if weight is None or w_qp is None or weight.dtype != np.int8 or np.any(w_qp.zero_point != 0):
        return False  # ORT's ConvInteger takes a per-tensor weight zero point only
    if not (w_qp.per_tensor or w_qp.axis % weight.ndim == 0):
        return False
    bias = graph.array(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if len(conv.input) > 2 and conv.input[2] and (bias is None or bias.dtype != np.float32):
        return False
    hint = conv.name or conv.output[0]
    channels = [-1] + [1] * (weight.ndim - 2)  # [C, 1, ...]: broadcasts over N, C, spatial
    scale = (x_qp.scale * w_qp.scale).astype(np.float32)
    inputs = [
        dq.input[0],
        weight_dq.input[0],
        dq.input[2],
        graph.add_initializer(np.array(0, np.int8), f"{hint}_weight_zero_point"),
    ]
    accumulated, real = graph.fresh(f"{hint}_int32"), graph.fresh(f"{hint}_float")
    output = conv.output[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    graph.remove(conv)
    graph.add_node("ConvInteger", inputs, [accumulated], f"{hint}_ConvInteger", **attrs)
    graph.add_node("Cast", [accumulated], [real], f"{hint}_Cast", to=onnx.TensorProto.FLOAT)
    scale_name = graph.add_initializer(scale if w_qp.per_tensor else scale.reshape(channels), f"{hint}_scale")
    if bias is None:
        graph.add_node("Mul", [real, scale_name], [output], f"{hint}_Mul")
    else:
        scaled = graph.fresh(f"{hint}_scaled")
        graph.add_node("Mul", [real, scale_name], [scaled], f"{hint}_Mul")
        bias_name = graph.add_initializer(bias.reshape(channels), f"{hint}_bias")
        graph.add_node("Add", [scaled, bias_name], [output], f"{hint}_Add")
    for unused in (dq, weight_dq):
        if not graph.consumers(unused.output[0]) and not graph.is_output(unused.output[0]):
            graph.remove(unused)
    return True


def float_kernels_for_unfused_layers(graph: Graph) -> None:
    """Give every quantized Conv without an output quantizer an explicit ConvInteger, and every
    quantized ConvTranspose (or Conv ConvInteger cannot run) a constant dequantized weight and a
    Div/Round/Clip/Mul input quantizer (same values)."""
    for node in list(graph.nodes):
        if node.op_type == "Conv" and _fused(graph, node):
            continue
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
            continue
        activation = _activation_dq(graph, node.input[0])
        if node.op_type == "Conv" and activation is not None and _integer_conv(graph, node, *activation):
            continue
        weight = _dequantized_constant(graph, node.input[1])
        if weight is None or activation is None:
            continue
        hint = node.name or node.output[0]
        weight_dq = graph.producer(node.input[1])
        assert weight_dq is not None
        graph.set_input(node, 1, graph.add_initializer(weight, f"{weight_dq.input[0]}_dequantized"))
        graph.set_input(node, 0, _simulated_input(graph, *activation, hint))
