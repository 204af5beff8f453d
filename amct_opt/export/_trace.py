"""Trace a :class:`QuantizedModel` to ONNX with QuantizeLinear/DequantizeLinear where its fake quant is.

While exporting, each *enabled* :class:`QuantLayer` computes through two
``torch.autograd.Function`` subclasses whose ``symbolic`` emits standard
QuantizeLinear -> DequantizeLinear pairs (int8 zero point, per-channel ``axis``
for weights) in place of the torch fake-quant math, and marks its output with a
``amct_opt::LayerOutput`` node that carries the layer name and, for the deploy
model, the observed output range, plus the output requantizer the layer
simulates (:meth:`QuantLayer.output_requant`), which both passes write as a Q/DQ
pair.  The marker nodes are removed again by the fake-quant and deploy passes.
Layers switched to float trace as plain float.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..calibration import widen_output_range
from ..errors import ExportError
from ..fake_quant import fake_quant
from ..quant_model import QuantizedModel, QuantLayer
from ..types import OutputRange
from ._names import DynamicAxes

__all__ = [
    "MARKER_DOMAIN",
    "MARKER_OP",
    "OPSET",
    "OutputRange",
    "observe_output_ranges",
    "quant_export_mode",
    "trace_to_onnx",
]

OPSET = 17
MARKER_DOMAIN = "amct_opt"
MARKER_OP = "LayerOutput"


class _QuantDequant(torch.autograd.Function):
    """Returns the precomputed torch fake-quant value; exports as QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, fake_quantized: torch.Tensor, scale: Any, zero_point: Any, axis: int | None
    ) -> torch.Tensor:
        return fake_quantized.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, fake_quantized: Any, scale: Any, zero_point: Any, axis: int | None) -> Any:
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.int8))
        kwargs = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, s, z, **kwargs)
        return g.op("DequantizeLinear", q, s, z, **kwargs)


class _LayerOutput(torch.autograd.Function):
    """Identity; exports as an ``amct_opt::LayerOutput`` marker naming the layer."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, y: torch.Tensor, name: str, lo: float | None, hi: float | None, requant: tuple[float, int] | None
    ) -> torch.Tensor:
        return y.clone()

    @staticmethod
    def symbolic(
        g: Any, y: Any, name: str, lo: float | None, hi: float | None, requant: tuple[float, int] | None
    ) -> Any:
        attrs: dict[str, Any] = {"layer_s": name}
        if lo is not None and hi is not None:
            attrs.update(lo_f=lo, hi_f=hi)
        if requant is not None:
            attrs.update(requant_scale_f=requant[0], requant_zero_point_i=requant[1])
        out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", y, **attrs)
        out.setType(y.type())
        return out


@dataclass(frozen=True)
class _LayerConstants:
    """A layer's factors as Python values, read once outside the trace."""

    scale_d: float
    offset_d: int
    scale_w: float | tuple[float, ...]
    offset_w: int | tuple[int, ...]
    weight_axis: int | None
    out_range: OutputRange | None
    requant: tuple[float, int] | None


def _constants(layer: QuantLayer, out_range: OutputRange | None) -> _LayerConstants:
    scale_w = tuple(float(s) for s in layer.get_buffer("scale_w").tolist())
    offset_w = tuple(int(z) for z in layer.get_buffer("offset_w").tolist())
    per_channel = layer.weight_axis is not None
    return _LayerConstants(
        scale_d=float(layer.get_buffer("scale_d")),
        offset_d=int(layer.get_buffer("offset_d")),
        scale_w=scale_w if per_channel else scale_w[0],
        offset_w=offset_w if per_channel else offset_w[0],
        weight_axis=layer.weight_axis,
        out_range=out_range,
        requant=layer.output_requant(),
    )


@contextlib.contextmanager
def _params_replaced(module: nn.Module, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """``module.<name>`` reads ``params[name]`` inside the block.

    ``torch.func.functional_call`` refuses to run under the JIT tracer, so the
    parameters are swapped directly and put back on exit.
    """
    saved = {name: module._parameters[name] for name in params}
    module._parameters.update(params)  # type: ignore[arg-type]
    try:
        yield
    finally:
        module._parameters.update(saved)


def _export_forward(layer: QuantLayer, c: _LayerConstants, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """:meth:`QuantLayer.quant_forward`, written with the exportable functions."""
    fake_quantized = fake_quant(x, layer.get_buffer("scale_d"), layer.get_buffer("offset_d"))
    qx = _QuantDequant.apply(x, fake_quantized, c.scale_d, c.offset_d, None)
    weight = _QuantDequant.apply(layer.module.weight, layer.fq_weight, c.scale_w, c.offset_w, c.weight_axis)
    params = {"weight": weight}
    if "bias" in layer.quantized_params:  # the int32-rounded bias, as a float constant
        params["bias"] = layer.get_buffer("fq_bias")
    with _params_replaced(layer.module, params):
        y = layer.module(qx, *args, **kwargs)
    lo, hi = (c.out_range.lo, c.out_range.hi) if c.out_range is not None else (None, None)
    return _LayerOutput.apply(y, layer.name, lo, hi, c.requant)


@contextlib.contextmanager
def quant_export_mode(qmodel: QuantizedModel, ranges: dict[str, OutputRange] | None) -> Iterator[None]:
    """Route every enabled layer through the exportable Q/DQ functions; restore on exit.

    ``ranges`` (layer name -> observed output range) is written into the markers.
    """
    patched: list[tuple[QuantLayer, Any]] = []
    try:
        for name, layer in qmodel.layers().items():
            if not layer.quant_enabled:
                continue
            out_range = None if ranges is None else ranges.get(name)
            previous = layer.__dict__.get("forward")
            layer.forward = functools.partial(_export_forward, layer, _constants(layer, out_range))  # type: ignore[method-assign]
            patched.append((layer, previous))
        yield
    finally:
        for layer, previous in patched:
            del layer.forward
            if previous is not None:
                layer.forward = previous  # type: ignore[method-assign]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def observe_output_ranges(qmodel: QuantizedModel, run: Callable[[nn.Module], Any]) -> dict[str, OutputRange]:
    """Min/max (widened to include 0) of every enabled layer's output while ``run(qmodel)`` runs.

    ``run`` is called once, in eval mode and under ``torch.no_grad``.
    """
    ranges: dict[str, OutputRange] = {}

    def hook(name: str, _module: nn.Module, _args: Any, out: Any) -> None:
        widen_output_range(ranges, name, out)

    handles = [
        layer.register_forward_hook(functools.partial(hook, name))
        for name, layer in qmodel.layers().items()
        if layer.quant_enabled
    ]
    try:
        with torch.no_grad(), _eval_mode(qmodel):
            run(qmodel)
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn top-level ``Constant`` tensor nodes into initializers (uniform lookups later)."""
    graph = model.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = numpy_helper.to_array(node.attribute[0].t)
            graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def trace_to_onnx(
    model: nn.Module,
    input_data: tuple[Any, ...],
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_axes: DynamicAxes | None,
    markers: bool = False,
) -> onnx.ModelProto:
    """Export ``model`` with the TorchScript exporter; return the loaded proto.

    Set ``markers`` when tracing inside :func:`quant_export_mode`: it declares
    the marker domain.  Constant nodes come back as initializers.
    """
    with tempfile.TemporaryDirectory(prefix="amct_opt_export_") as tmp:
        path = Path(tmp) / "traced.onnx"
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message="You are using the legacy TorchScript", category=DeprecationWarning
                )
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
                warnings.filterwarnings("ignore", message="No names were found for specified dynamic axes")
                torch.onnx.export(
                    model,
                    input_data,
                    str(path),
                    input_names=list(input_names) if input_names is not None else None,
                    output_names=list(output_names) if output_names is not None else None,
                    dynamic_axes=cast(Any, dynamic_axes),
                    opset_version=OPSET,
                    do_constant_folding=True,
                    custom_opsets={MARKER_DOMAIN: 1} if markers else None,
                    dynamo=False,
                )
        except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError) as exc:
            raise ExportError(f"torch.onnx.export failed: {exc}") from exc
        proto = onnx.load(str(path))
    _constants_to_initializers(proto)
    return proto
