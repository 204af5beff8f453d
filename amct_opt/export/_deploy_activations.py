"""Deploy passes on activations: shared quantizers and requantized convolution outputs.

ORT's CPU provider fuses ``DQ(x), DQ(w), DQ(b) -> Conv -> Q`` into QLinearConv
only when the Conv's single consumer is a QuantizeLinear; it first drops a
Relu/Clip between them when the Q's range lies inside the clip range.  Gemm and
MatMul fuse (QGemm, MatMulIntegerToFloat) without an output Q, so only
convolutions are given one here.  Activations end up uint8 (weights stay
int8): the U8S8 form ORT's x86 kernels take, which its own s8->u8 rewrite
misses when a quantizer feeds several dequantizers.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from ..requant import Bounds, contains
from ._graph import Graph
from ._markers import LayerOutput
from ._qdq import QParams, add_qdq, asymmetric_qparams, qparams

__all__ = [
    "activations_to_uint8",
    "add_simulated_requantizers",
    "requantize_conv_outputs",
    "share_activation_quantizers",
]

logger = logging.getLogger(__name__)

#: How far (float32 ulps) a Q's scale may be lowered so that its range fits a Relu/Clip.
_MAX_SCALE_NUDGE_ULPS = 16


def _inside(bounds: Bounds, qp: QParams) -> bool:
    """ORT's test (ClipQuantFusion) for dropping a Relu/Clip in front of a Q with ``qp``."""
    return contains(bounds, float(qp.scale), int(qp.zero_point))


def _activation_q(graph: Graph, node: onnx.NodeProto) -> QParams | None:
    if node.op_type != "QuantizeLinear" or graph.array(node.input[0]) is not None:
        return None
    qp = qparams(graph, node)
    return qp if qp is not None and qp.per_tensor else None


def _dq_consumers(graph: Graph, q: onnx.NodeProto, qp: QParams) -> list[onnx.NodeProto]:
    return [
        c
        for c in graph.consumers(q.output[0])
        if c.op_type == "DequantizeLinear" and (cp := qparams(graph, c)) is not None and cp.same_as(qp)
    ]


def _merge_dequantizers(graph: Graph, dqs: list[onnx.NodeProto]) -> None:
    keep, *rest = dqs
    for dq in rest:
        if graph.is_output(dq.output[0]):
            continue
        graph.remove(dq)
        graph.replace_uses(dq.output[0], keep.output[0])


def share_activation_quantizers(graph: Graph) -> None:
    """Quantize each tensor once per distinct (scale, zero point); dequantize it once.

    Two quantized layers reading the same tensor with the same parameters get one
    Q and one DQ.  Different parameters are kept apart: merging them would make
    the deploy model compute something the fake-quant model does not.
    """
    by_source: dict[str, list[tuple[onnx.NodeProto, QParams]]] = {}
    for node in graph.nodes:
        qp = _activation_q(graph, node)
        if qp is not None:
            by_source.setdefault(node.input[0], []).append((node, qp))
    for quantizers in by_source.values():
        groups: list[list[tuple[onnx.NodeProto, QParams]]] = []
        for q, qp in quantizers:
            group = next((g for g in groups if g[0][1].same_as(qp)), None)
            if group is None:
                groups.append([(q, qp)])
            else:
                group.append((q, qp))
        for group in groups:
            keep = group[0][0]
            for q, _ in group[1:]:
                graph.remove(q)
                graph.replace_uses(q.output[0], keep.output[0])
            dqs = _dq_consumers(graph, keep, group[0][1])
            if len(dqs) > 1:
                _merge_dequantizers(graph, dqs)


def _bounds(graph: Graph, act: onnx.NodeProto) -> Bounds | None:
    """The clip range of a Relu or a Clip with constant bounds."""
    if act.op_type == "Relu":
        return Bounds(0.0, math.inf)
    if act.op_type != "Clip":
        return None
    limits = [-math.inf, math.inf]
    for i, name in enumerate(act.input[1:3]):
        if not name:
            continue
        value = graph.array(name)
        if value is None or value.size != 1:
            return None
        limits[i] = float(value)
    return Bounds(limits[0], limits[1])


def _set_params(graph: Graph, q: onnx.NodeProto, old: QParams, new: QParams, hint: str) -> None:
    """Give ``q`` and its matching dequantizers the parameters ``new``."""
    scale = graph.add_initializer(new.scale, f"{hint}_scale")
    zero_point = graph.add_initializer(new.zero_point, f"{hint}_zero_point")
    for node in [q, *_dq_consumers(graph, q, old)]:
        graph.set_input(node, 1, scale)
        graph.set_input(node, 2, zero_point)


def _fit(graph: Graph, q: onnx.NodeProto, qp: QParams, bounds: Bounds) -> bool:
    """Make ``q``'s range lie inside ``bounds`` so that ORT drops the Relu/Clip before it.

    A scale a few float32 ulps too large is lowered by those ulps (the same
    quantizer in practice).  A range reaching outside the bounds, as offset-0
    quantizers after a ReLU do, is cut to the bounds and requantized
    asymmetrically: no value the Relu/Clip lets through is represented worse.
    Returns False when the range and the bounds do not overlap.
    """
    if _inside(bounds, qp):
        return True
    scale = qp.scale
    for _ in range(_MAX_SCALE_NUDGE_ULPS):
        scale = np.nextafter(scale, np.float32(0)).astype(np.float32)
        nudged = QParams(scale, qp.zero_point, None)
        if _inside(bounds, nudged):
            _set_params(graph, q, qp, nudged, f"{q.name}_fitted")
            return True
    lower, upper = qp.real_range()
    lo, hi = max(lower, bounds.lo), min(upper, bounds.hi)
    if not lo < hi:
        return False
    refitted = asymmetric_qparams(lo, hi)
    if not _inside(bounds, refitted):
        return False
    _set_params(graph, q, qp, refitted, f"{q.name}_fitted")
    return True


def _dequantized(graph: Graph, q: onnx.NodeProto) -> str:
    """The output of a DQ matching ``q`` (added if there is none)."""
    qp = qparams(graph, q)
    dqs = _dq_consumers(graph, q, qp) if qp is not None else []
    if dqs:
        return dqs[0].output[0]
    out = graph.fresh(f"{q.output[0]}_dequantized")
    graph.add_node(
        "DequantizeLinear", [q.output[0], q.input[1], q.input[2]], [out], f"{q.name}_DequantizeLinear"
    )
    return out


def _is_float_layer(graph: Graph, node: onnx.NodeProto) -> bool:
    """A Conv/ConvTranspose/Gemm/MatMul with a constant float weight: a layer switched to float."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
        return False
    weight = graph.array(node.input[1])
    return weight is not None and weight.dtype == np.float32


def _add_output_qdq(graph: Graph, output: LayerOutput, qp: QParams) -> None:
    """Put Q/DQ with ``qp`` between the layer's node and the readers of its output."""
    node = graph.producer(output.tensor)
    assert node is not None
    before = graph.fresh(f"{output.tensor}_float")
    graph.rename_output(node, list(node.output).index(output.tensor), before)
    add_qdq(graph, before, output.tensor, qp, f"{output.layer}_output")


def _simulated(output: LayerOutput) -> QParams | None:
    if output.requant is None:
        return None
    scale, zero_point = output.requant
    return QParams(np.array(scale, np.float32), np.array(zero_point, np.int8), None)


def add_simulated_requantizers(graph: Graph, outputs: list[LayerOutput]) -> None:
    """The fake-quant model's copy of the deploy's output requantizers: the ones the torch layers simulate."""
    for output in outputs:
        qp = _simulated(output)
        if qp is not None and graph.producer(output.tensor) is not None:
            _add_output_qdq(graph, output, qp)


def _unsimulated(output: LayerOutput, why: str) -> None:
    if output.requant is not None:
        logger.warning(
            "layer %s: the fake-quant model requantizes its output, but the deploy model does not (%s); "
            "the two differ there by up to one quantization step", output.layer, why,
        )


def _requantize(graph: Graph, output: LayerOutput) -> None:
    tensor = output.tensor
    conv = graph.producer(tensor)
    if conv is None or conv.op_type != "Conv":
        _unsimulated(output, "it is not a Conv in the ONNX graph")
        return
    act, bounds = None, Bounds(-math.inf, math.inf)
    consumers = graph.consumers(tensor)
    if not graph.is_output(tensor) and len(consumers) == 1:
        act_bounds = _bounds(graph, consumers[0])
        if act_bounds is not None:
            act, bounds = consumers[0], act_bounds
    tail = act.output[0] if act is not None else tensor
    tail_consumers = graph.consumers(tail)
    if any(_is_float_layer(graph, node) for node in tail_consumers):
        _unsimulated(output, "a layer kept float reads it")
        return
    if not graph.is_output(tail):
        quantizers = [(q, qp) for q in tail_consumers if (qp := _activation_q(graph, q)) is not None]
        quantizers.sort(key=lambda item: not _inside(bounds, item[1]))
        for q, qp in quantizers:
            if not _fit(graph, q, qp, bounds):
                continue
            shared = _dequantized(graph, q)
            for node in tail_consumers:
                if node is not q:
                    for i, name in enumerate(node.input):
                        if name == tail:
                            graph.set_input(node, i, shared)
            used, simulated = qparams(graph, q), _simulated(output)
            if simulated is not None and (used is None or not used.same_as(simulated)):
                _unsimulated(output, "its readers share another quantizer")
            return
    qp = _simulated(output)
    if qp is None:
        if output.out_range is None:
            return
        lo = min(max(output.out_range.lo, bounds.lo), bounds.hi)
        hi = max(min(output.out_range.hi, bounds.hi), bounds.lo)
        qp = asymmetric_qparams(lo, hi)
        logger.debug("layer %s: its output requantizer is not simulated by the fake-quant model", output.layer)
    _add_output_qdq(graph, output, qp)
    if act is not None and _inside(bounds, qp):
        graph.bypass(act)


def requantize_conv_outputs(graph: Graph, outputs: list[LayerOutput]) -> None:
    """Give every quantized Conv a QuantizeLinear as its only consumer (after a droppable Relu/Clip).

    Reuses a Q that already reads the conv's (activated) output, fitted to the
    activation range if needed (see :func:`_fit`), and routes the other readers
    through its DQ.  Otherwise adds a Q/DQ on the conv output with the layer's
    observed output range, clamped to the activation range, and drops the
    then-redundant Relu/Clip.

    A conv whose (activated) output is read directly by a layer switched to float
    is left alone: that layer keeps seeing the float values it saw in the
    fake-quant model, and ORT runs the conv with a float kernel.
    """
    for output in outputs:
        _requantize(graph, output)


def activations_to_uint8(graph: Graph) -> None:
    """Activation Q/DQ pairs from int8 to uint8: zero point + 128, the same real values."""
    converted: dict[int, str] = {}
    for q in [n for n in graph.nodes if n.op_type == "QuantizeLinear"]:
        qp = _activation_q(graph, q)
        readers = graph.consumers(q.output[0])
        if qp is None or graph.is_output(q.output[0]):
            continue
        dqs = _dq_consumers(graph, q, qp)
        if len(dqs) != len(readers):
            continue
        zero_point = int(qp.zero_point) + 128
        if zero_point not in converted:
            converted[zero_point] = graph.add_initializer(
                np.array(zero_point, np.uint8), f"zero_point_u8_{zero_point}"
            )
        for node in [q, *dqs]:
            graph.set_input(node, 2, converted[zero_point])
