"""QuantizeLinear/DequantizeLinear parameters read from, and written into, a :class:`Graph`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..fake_quant import QMAX, QMIN, range_params
from ._graph import Graph

__all__ = [
    "QParams",
    "add_qdq",
    "add_simulated_qdq",
    "asymmetric_qparams",
    "dequantize_array",
    "qparams",
    "quantize_array",
]


@dataclass(frozen=True)
class QParams:
    """Scale, zero point and (per-axis only) axis of one Q or DQ node."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None

    @property
    def per_tensor(self) -> bool:
        return self.scale.ndim == 0

    def same_as(self, other: QParams) -> bool:
        return (
            self.axis == other.axis
            and self.scale.shape == other.scale.shape
            and self.zero_point.dtype == other.zero_point.dtype
            and bool(np.array_equal(self.scale, other.scale))
            and bool(np.array_equal(self.zero_point, other.zero_point))
        )

    def real_range(self) -> tuple[float, float]:
        """The real interval a per-tensor int8 quantizer represents (float32 arithmetic, as ORT)."""
        zp = np.float32(self.zero_point)
        scale = np.float32(self.scale)
        return float(scale * (np.float32(QMIN) - zp)), float(scale * (np.float32(QMAX) - zp))


def qparams(graph: Graph, node: onnx.NodeProto) -> QParams | None:
    """The constant int8 parameters of a Q/DQ node, or None (non-constant, non-int8, or no zero point)."""
    if len(node.input) < 3:
        return None
    scale, zero_point = graph.array(node.input[1]), graph.array(node.input[2])
    if scale is None or zero_point is None or zero_point.dtype != np.int8:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.ndim == 1 else None
    return QParams(scale.astype(np.float32), zero_point, axis)


def _broadcast(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None:
        return values
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return values.reshape(shape)


def quantize_array(x: np.ndarray, qp: QParams) -> np.ndarray:
    """ONNX QuantizeLinear to int8 (division, round half to even, saturate)."""
    scale = _broadcast(qp.scale, qp.axis, x.ndim)
    zero_point = _broadcast(qp.zero_point.astype(np.float32), qp.axis, x.ndim)
    q = np.round(x.astype(np.float32) / scale) + zero_point
    return np.clip(q, QMIN, QMAX).astype(np.int8)


def dequantize_array(q: np.ndarray, qp: QParams) -> np.ndarray:
    """ONNX DequantizeLinear in float32: ``(q - zero_point) * scale``, per axis where ``qp`` has one."""
    scale = _broadcast(qp.scale, qp.axis, q.ndim)
    zero_point = _broadcast(qp.zero_point.astype(np.float32), qp.axis, q.ndim)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


def asymmetric_qparams(lo: float, hi: float) -> QParams:
    """Per-tensor int8 parameters over [lo, hi] widened to include 0 (see :func:`amct_opt.fake_quant.range_params`)."""
    scale, zero_point = range_params(lo, hi)
    return QParams(np.array(scale, np.float32), np.array(zero_point, np.int8), None)


def add_qdq(graph: Graph, source: str, target: str, qp: QParams, hint: str) -> onnx.NodeProto:
    """Add ``target = DequantizeLinear(QuantizeLinear(source))``; return the Q node."""
    scale = graph.add_initializer(qp.scale, f"{hint}_scale")
    zero_point = graph.add_initializer(qp.zero_point, f"{hint}_zero_point")
    quantized = graph.fresh(f"{hint}_quantized")
    attrs = {} if qp.axis is None else {"axis": qp.axis}
    q = graph.add_node(
        "QuantizeLinear", [source, scale, zero_point], [quantized], f"{hint}_QuantizeLinear", **attrs
    )
    graph.add_node(
        "DequantizeLinear", [quantized, scale, zero_point], [target], f"{hint}_DequantizeLinear", **attrs
    )
    return q


def add_simulated_qdq(
    graph: Graph, source: str, target: str, qp: QParams, hint: str, ndim: int | None = None
) -> None:
    """Add ``target = Clip(Round(source / scale), QMIN - zp, QMAX - zp) * scale``.

    The same values as :func:`add_qdq` bit for bit (true division, round half to
    even, integers exact in float32), in plain float ops that no ORT fusion turns
    into an integer kernel.  A per-axis ``qp`` needs ``source``'s rank ``ndim``:
    its scales are broadcast along ``qp.axis``, and zero points that differ per
    channel are applied with Max/Min (Clip takes scalar bounds only).
    """
    per_axis = not qp.per_tensor
    if per_axis and ndim is None:
        raise ValueError("add_simulated_qdq: a per-axis quantizer needs the source's rank")
    scale_value = qp.scale.astype(np.float32)
    zero_point = qp.zero_point.astype(np.float32)
    if per_axis:
        scale_value = _broadcast(scale_value, qp.axis, ndim or 0)
        zero_point = _broadcast(zero_point, qp.axis, ndim or 0)
        if np.all(zero_point == zero_point.flat[0]):
            zero_point = np.array(zero_point.flat[0], np.float32)
    scale = graph.add_initializer(scale_value, f"{hint}_scale")
    low = graph.add_initializer((np.float32(QMIN) - zero_point).astype(np.float32), f"{hint}_qmin")
    high = graph.add_initializer((np.float32(QMAX) - zero_point).astype(np.float32), f"{hint}_qmax")
    divided, rounded, clipped = (graph.fresh(f"{hint}_{step}") for step in ("div", "round", "clip"))
    graph.add_node("Div", [source, scale], [divided], f"{hint}_Div")
    graph.add_node("Round", [divided], [rounded], f"{hint}_Round")
    if zero_point.ndim == 0:
        graph.add_node("Clip", [rounded, low, high], [clipped], f"{hint}_Clip")
    else:
        raised = graph.fresh(f"{hint}_max")
        graph.add_node("Max", [rounded, low], [raised], f"{hint}_Max")
        graph.add_node("Min", [raised, high], [clipped], f"{hint}_Min")
    graph.add_node("Mul", [clipped, scale], [target], f"{hint}_Mul")
