"""The deploy model's output requantizers, found with torch.fx, so the fake-quant model computes them too.

ONNX Runtime runs a quantized Conv as QLinearConv only when a QuantizeLinear
reads its output (after a Relu/Clip, which it then drops).  Where a quantized
layer reads that output, its own input quantizer serves.  Where none does (the
output feeds an Add, a pooling, a reshape or the graph output), the deploy
model adds a requantizer with the layer's calibrated output range, clamped to
the activation's range (see :mod:`amct_opt.export._deploy_activations`).

:func:`requant_sites` finds those convolutions in the torch model, with
their activation's range, so that :class:`~amct_opt.quant_model.QuantLayer`
applies the same requantizer (:func:`requant_params`) to its output: the
search, the sensitivity ranking and the fake-quant ONNX model see the values the
deploy model computes.  So does a Conv whose output a quantized layer and
something else read: the deploy model gives that something the dequantized
output of the layer's input quantizer.  A model that torch.fx cannot trace keeps no simulated
requantizer (logged); its deploy model then differs from the fake-quant one at
those outputs, by at most one quantization step of each.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from .fake_quant import QMAX, QMIN, range_params
from .types import OutputRange

__all__ = ["Bounds", "Site", "contains", "requant_params", "requant_sites"]

logger = logging.getLogger(__name__)

#: Modules that export to nothing in eval mode: their readers read their input.
_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu}
_CLAMP_FUNCTIONS = {torch.clamp, torch.clip}
_EPS = float(np.finfo(np.float32).eps)
_F = torch.nn.functional
_LAYER_FUNCTIONS = {_F.linear, _F.conv1d, _F.conv2d, _F.conv3d, _F.conv_transpose1d, _F.conv_transpose2d}


@dataclass(frozen=True)
class Bounds:
    """The clip range of the Relu/Clip right after a layer (-inf, inf when there is none)."""

    lo: float = -math.inf
    hi: float = math.inf


def requant_params(out_range: OutputRange, bounds: Bounds) -> tuple[float, int]:
    """The requantizer's ``(scale, zero_point)``: the output range clamped to the activation's, as the deploy's."""
    lo = min(max(out_range.lo, bounds.lo), bounds.hi)
    hi = max(min(out_range.hi, bounds.hi), bounds.lo)
    scale, zero_point = range_params(lo, hi)
    return float(scale), zero_point


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _clamp_bounds(
    node: torch.fx.Node, lo_key: str, hi_key: str, defaults: tuple[float | None, float | None] = (None, None)
) -> Bounds | None:
    """Bounds of clamp/hardtanh-like calls with constant limits, else None."""
    args = list(node.args[1:])
    lo = node.kwargs.get(lo_key, args[0] if args else defaults[0])
    hi = node.kwargs.get(hi_key, args[1] if len(args) > 1 else defaults[1])
    lo_v, hi_v = _number(lo), _number(hi)
    if (lo is not None and lo_v is None) or (hi is not None and hi_v is None) or (lo is None and hi is None):
        return None
    return Bounds(-math.inf if lo_v is None else lo_v, math.inf if hi_v is None else hi_v)


def _activation_bounds(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> Bounds | None:
    """The clip range of ``node`` when it exports as a Relu or a constant Clip, else None."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.ReLU):
            return Bounds(0.0, math.inf)
        if isinstance(module, nn.Hardtanh):  # ReLU6 too
            return Bounds(float(module.min_val), float(module.max_val))
        return None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return Bounds(0.0, math.inf)
        if node.target is torch.nn.functional.relu6:
            return Bounds(0.0, 6.0)
        if node.target is torch.nn.functional.hardtanh:
            return _clamp_bounds(node, "min_val", "max_val", (-1.0, 1.0))
        if node.target in _CLAMP_FUNCTIONS:
            return _clamp_bounds(node, "min", "max")
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return Bounds(0.0, math.inf)
        if node.target in ("clamp", "clip", "clamp_", "clip_"):
            return _clamp_bounds(node, "min", "max")
    return None


def _readers(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> list[torch.fx.Node]:
    """The nodes reading ``node``'s value, looking through modules that export to nothing."""
    found: list[torch.fx.Node] = []
    for user in node.users:
        if user.op == "call_module" and isinstance(modules.get(str(user.target)), _TRANSPARENT):
            found += _readers(user, modules)
        else:
            found.append(user)
    return found


def _is_layer(node: torch.fx.Node, modules: Mapping[str, nn.Module], wrapped: Mapping[int, str]) -> bool:
    """A Conv/Linear (wrapped or not) or a product with a constant weight: the deploy model's "layer"."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return id(module) in wrapped or isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
    if node.op == "call_function":
        if node.target in _LAYER_FUNCTIONS:
            return True
        if node.target in (torch.matmul, operator.matmul, torch.mm, torch.bmm):
            return any(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in node.args)
    return False


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class Site:
    """Where the deploy model requantizes a Conv's (activated) output.

    ``readers`` empty: no layer reads it, so a requantizer with the layer's own
    output range is added.  Else those quantized layers read it, and so does
    something else (an Add, a pooling, the graph output): that something reads
    the dequantized output of the readers' input quantizer, while they are all
    quantized (one of them kept float, the Conv runs a float kernel instead).
    """

    bounds: Bounds
    readers: tuple[str, ...] = ()


def requant_sites(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, Site]:
    """The wrapped Conv layers whose output the deploy model requantizes (see :class:`Site`).

    ``layers`` maps names to the modules wrapping them inside ``model`` (each one
    a leaf of the trace; ``module.module`` is the wrapped layer).  A layer called
    more than once, one read by a layer that is not wrapped, or a model torch.fx
    cannot trace, gives no entry.
    """
    convs = {
        name
        for name, wrapper in layers.items()
        if isinstance(inner := getattr(wrapper, "module", wrapper), nn.modules.conv._ConvNd) and not inner.transposed
    }
    if not convs:
        return {}
    by_id = {id(wrapper): name for name, wrapper in layers.items()}
    try:
        graph = _Tracer(set(by_id)).trace(model)
    except Exception as exc:  # noqa: BLE001 - any trace failure means "not traceable"
        logger.info(
            "torch.fx cannot trace %s (%s: %s): the fake-quant model does not simulate the deploy model's "
            "requantized convolution outputs", type(model).__name__, type(exc).__name__, exc,
        )
        return {}
    modules = dict(model.named_modules(remove_duplicate=False))
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and (module := modules.get(str(node.target))) is not None:
            if id(module) in by_id:
                calls.setdefault(by_id[id(module)], []).append(node)
    found: dict[str, Site] = {}
    for name in convs:
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            continue
        tail, bounds = nodes[0], Bounds()
        readers = _readers(tail, modules)
        if len(readers) == 1 and (act := _activation_bounds(readers[0], modules)) is not None:
            tail, bounds = readers[0], act
            readers = _readers(tail, modules)
        layer_readers = [r for r in readers if _is_layer(r, modules, by_id)]
        wrapped = [by_id.get(id(modules.get(str(r.target)))) for r in layer_readers if r.op == "call_module"]
        if len(wrapped) != len(layer_readers) or None in wrapped:
            continue  # a float layer reads it: the deploy's Conv runs a float kernel
        if layer_readers and len(layer_readers) == len(readers):
            continue  # only quantized layers read it: each quantizes it itself, as in torch
        found[name] = Site(bounds, tuple(sorted({str(n) for n in wrapped})))
    return found


def contains(bounds: Bounds, scale: float, zero_point: int) -> bool:
    """ORT's test for dropping a Relu/Clip in front of a quantizer ``(scale, zero_point)`` (as the deploy's)."""
    s = np.float32(scale)
    zp = np.float32(zero_point)
    lower, upper = float(s * (np.float32(QMIN) - zp)), float(s * (np.float32(QMAX) - zp))
    return bounds.lo - lower <= _EPS and upper - bounds.hi <= _EPS
