"""Deploy passes on constants: int8 weight initializers, weight transposes, int32 biases."""

from __future__ import annotations

import numpy as np
import onnx

from ._graph import Graph
from ._qdq import QParams, qparams, quantize_array

__all__ = ["fold_weight_quantizers", "fold_weight_transposes", "quantize_biases", "static_tensors"]

_INT32 = np.iinfo(np.int32)


def fold_weight_quantizers(graph: Graph) -> None:
    """Replace ``QuantizeLinear(float initializer)`` by the int8 initializer it computes."""
    folded: dict[tuple[str, ...], str] = {}
    for node in [n for n in graph.nodes if n.op_type == "QuantizeLinear"]:
        weight, qp = graph.array(node.input[0]), qparams(graph, node)
        if weight is None or qp is None or weight.dtype != np.float32:
            continue
        key = (*node.input, str(qp.axis))
        if key not in folded:
            folded[key] = graph.add_initializer(quantize_array(weight, qp), f"{node.input[0]}_quantized")
        graph.remove(node)
        graph.replace_uses(node.output[0], folded[key])


def fold_weight_transposes(graph: Graph) -> None:
    """``DequantizeLinear(int8) -> Transpose`` becomes ``DequantizeLinear(transposed int8)``.

    The exporter writes a 3-D ``Linear`` as ``MatMul(x, Transpose(W))``; with the
    transpose folded, ORT sees a constant int8 weight feeding the MatMul.
    """
    for node in [n for n in graph.nodes if n.op_type == "Transpose"]:
        dq = graph.producer(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q, qp = graph.array(dq.input[0]), qparams(graph, dq)
        if q is None or qp is None or q.dtype != np.int8:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(q.ndim))[::-1])
        transposed = graph.add_initializer(np.transpose(q, perm), f"{dq.input[0]}_transposed")
        attrs = {} if qp.axis is None else {"axis": perm.index(qp.axis % q.ndim)}
        graph.add_node(
            "DequantizeLinear",
            [transposed, dq.input[1], dq.input[2]],
            [node.output[0]],
            f"{dq.name}_transposed",
            **attrs,
        )
        graph.remove(node)
        if not graph.consumers(dq.output[0]) and not graph.is_output(dq.output[0]):
            graph.remove(dq)


def _weight_params(graph: Graph, node: onnx.NodeProto, channel_axis: int) -> QParams | None:
    """The weight DQ's parameters if input 1 of ``node`` is an int8 constant, per-tensor or per output channel."""
    dq = graph.producer(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or graph.array(dq.input[0]) is None:
        return None
    qp = qparams(graph, dq)
    if qp is None or not (qp.per_tensor or qp.axis == channel_axis):
        return None
    return qp


def _input_params(graph: Graph, node: onnx.NodeProto) -> QParams | None:
    dq = graph.producer(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    qp = qparams(graph, dq)
    return qp if qp is not None and qp.per_tensor else None


def static_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the tensors whose shape ONNX shape inference knows completely (no symbolic dims)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (ValueError, onnx.shape_inference.InferenceError):
        return set()
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {
        v.name
        for v in values
        if v.type.tensor_type.HasField("shape")
        and all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)
    }


def _bias_site(
    graph: Graph, node: onnx.NodeProto, static: set[str]
) -> tuple[onnx.NodeProto, int, int] | None:
    """Where ``node``'s float bias is: (node holding it, input index, weight output-channel axis)."""
    if node.op_type == "Conv" and len(node.input) == 3 and node.input[2]:
        return node, 2, 0
    if node.op_type == "Gemm" and len(node.input) == 3 and node.input[2]:
        attrs = {a.name: a for a in node.attribute}
        if any(name in attrs and attrs[name].f != 1.0 for name in ("alpha", "beta")):
            return None
        if "transA" in attrs and attrs["transA"].i:
            return None
        trans_b = "transB" in attrs and attrs["transB"].i
        return node, 2, 0 if trans_b else 1
    if node.op_type == "MatMul" and node.input[0] in static:
        consumers = graph.consumers(node.output[0])
        if len(consumers) != 1 or consumers[0].op_type != "Add" or graph.is_output(node.output[0]):
            return None
        add = consumers[0]
        index = 1 - list(add.input).index(node.output[0])
        return add, index, 1
    return None


def quantize_biases(graph: Graph, static: set[str]) -> None:
    """Float bias of a quantized Conv/Gemm/MatMul+Add -> int32 initializer + DequantizeLinear.

    Scale ``scale_d * scale_w`` (per output channel), zero point 0: the form ORT
    fuses into QLinearConv/QGemm, which round the bias to that scale anyway.
    Elsewhere the bias stays float, exactly as in the fake-quant model:

    - ConvTranspose: ORT's CPU provider has no integer kernel for it;
    - MatMul + Add (a Linear on 3-D input) whose input shape is not fully known
      (``static`` lists the tensors whose shape is): ORT only turns MatMul + Add
      into (Q)Gemm for static shapes; otherwise it runs MatMulIntegerToFloat and
      an int32 bias would only add a rounding error and a DequantizeLinear.
    """
    for node in list(graph.nodes):
        site = _bias_site(graph, node, static)
        if site is None:
            continue
        holder, index, channel_axis = site
        bias = graph.array(holder.input[index])
        x_qp, w_qp = _input_params(graph, node), _weight_params(graph, node, channel_axis)
        if bias is None or bias.dtype != np.float32 or bias.ndim != 1 or x_qp is None or w_qp is None:
            continue
        scale = (x_qp.scale * w_qp.scale).astype(np.float32)
        if not w_qp.per_tensor and scale.shape != bias.shape:
            continue
        q_bias = np.clip(np.round(bias / scale), _INT32.min, _INT32.max).astype(np.int32)
        hint = f"{holder.input[index]}_int32"
        inputs = [
            graph.add_initializer(q_bias, hint),
            graph.add_initializer(scale, f"{hint}_scale"),
            graph.add_initializer(np.zeros(scale.shape, np.int32), f"{hint}_zero_point"),
        ]
        attrs = {} if w_qp.per_tensor else {"axis": 0}
        dequantized = graph.fresh(f"{hint}_dequantized")
        graph.add_node("DequantizeLinear", inputs, [dequantized], f"{hint}_DequantizeLinear", **attrs)
        graph.set_input(holder, index, dequantized)
