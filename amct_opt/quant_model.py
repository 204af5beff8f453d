"""A model whose quantizable layers switch between fake-quant INT8 and float in O(1).

:func:`build_quantized_model` wraps each calibrated layer of a (folded, copied)
float model in a :class:`QuantLayer`.  The fake-quant weight is computed once;
switching a layer is flipping a flag, so a search never re-calibrates, never
copies the model and never touches the user's module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .errors import InputError
from .fake_quant import fake_quant, fake_quant_per_channel
from .layers import weight_channel_axis
from .types import LayerQuantFactors, OutputRanges, Plan, Record

__all__ = ["QuantLayer", "QuantizedModel", "build_quantized_model"]


class QuantLayer(nn.Module):
    """A Conv/Linear layer with INT8 fake quantization of its input and weight.

    Attributes:
        name: the wrapped layer's qualified name in the original model.
        module: the float layer (BN already folded in).
        factors: its quantization factors.
        weight_axis: the weight's output-channel axis (per-channel scales), or
            ``None`` when one per-tensor scale is used.
        quant_enabled: when False the layer runs exactly as the float layer.
    """

    def __init__(self, name: str, module: nn.Module, factors: LayerQuantFactors) -> None:
        super().__init__()
        self.name = name
        self.module = module
        self.factors = factors
        self.quant_enabled = True
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        per_channel = len(factors.scale_w) > 1
        self.weight_axis: int | None = weight_channel_axis(module) if per_channel else None
        if self.weight_axis is not None and weight.shape[self.weight_axis] != len(factors.scale_w):
            raise InputError(
                f"record_file: layer {name!r} has {len(factors.scale_w)} weight scales, "
                f"but its weight has {weight.shape[self.weight_axis]} output channels"
            )
        device, f32 = weight.device, torch.float32
        self.register_buffer("scale_d", torch.tensor(factors.scale_d, device=device, dtype=f32))
        self.register_buffer("offset_d", torch.tensor(float(factors.offset_d), device=device, dtype=f32))
        self.register_buffer("scale_w", torch.tensor(factors.scale_w, device=device, dtype=f32))
        self.register_buffer("offset_w", torch.tensor([float(o) for o in factors.offset_w], device=device, dtype=f32))
        with torch.no_grad():
            self.register_buffer("fq_weight", self._fake_quant_weight(weight.detach()))

    def _fake_quant_weight(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        scale_w, offset_w = self.get_buffer("scale_w"), self.get_buffer("offset_w")
        if self.weight_axis is None:
            out = fake_quant(w, scale_w[0], offset_w[0])
        else:
            out = fake_quant_per_channel(w, scale_w, offset_w, self.weight_axis)
        return out.to(weight.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x.float(), self.get_buffer("scale_d"), self.get_buffer("offset_d")).to(x.dtype)

    def quant_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The fake-quant computation, whatever ``quant_enabled`` says."""
        return functional_call(
            self.module, {"weight": self.get_buffer("fq_weight")}, (self.quantize_input(x), *args), kwargs
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.quant_enabled:
            return self.module(x, *args, **kwargs)
        return self.quant_forward(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, quant_enabled={self.quant_enabled}"


class QuantizedModel(nn.Module):
    """The float model with its calibrated layers wrapped; switch them with :meth:`set_plan`.

    ``output_ranges`` holds the layers' output ranges seen during calibration,
    for the deploy export (empty when unknown).
    """

    def __init__(
        self, model: nn.Module, layers: dict[str, QuantLayer], output_ranges: OutputRanges | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self._layers = layers
        self.output_ranges: OutputRanges = dict(output_ranges or {})

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def layer(self, name: str) -> QuantLayer:
        """The wrapped layer ``name``; an unknown name is an :class:`InputError` listing the known ones."""
        if name not in self._layers:
            raise InputError(f"layer: unknown layer {name!r}; known layers: {self.layer_names}")
        return self._layers[name]

    def layers(self) -> dict[str, QuantLayer]:
        return dict(self._layers)

    @property
    def plan(self) -> dict[str, bool]:
        return {name: layer.quant_enabled for name, layer in self._layers.items()}

    def set_plan(self, plan: Plan) -> None:
        """Quantize exactly the layers mapped to True; unknown names are an error."""
        unknown = sorted(set(plan) - set(self._layers))
        if unknown:
            raise InputError(f"plan: unknown layer(s) {unknown}; known layers: {self.layer_names}")
        for name, quantized in plan.items():
            self._layers[name].quant_enabled = bool(quantized)

    def set_all(self, quantized: bool) -> None:
        self.set_plan(dict.fromkeys(self._layers, quantized))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def build_quantized_model(
    float_model: nn.Module, record: Record, output_ranges: OutputRanges | None = None
) -> QuantizedModel:
    """Wrap, in place, every layer of ``float_model`` named in ``record``.

    ``output_ranges`` are the layers' calibration output ranges, if known (see
    :class:`amct_opt.calibration.Calibration`).

    ``float_model`` must be the private copy made by :func:`amct_opt.fusion.fold_conv_bn`.
    """
    aliases: dict[int, list[str]] = {}
    for alias, module in float_model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(alias)
    layers: dict[str, QuantLayer] = {}
    for name, factors in record.items():
        try:
            module = float_model.get_submodule(name)
        except AttributeError as exc:
            raise InputError(f"record_file: layer {name!r} is not a module of the model") from exc
        layer = QuantLayer(name, module, factors)
        for alias in aliases[id(module)]:
            float_model.set_submodule(alias, layer)
        layers[name] = layer
    return QuantizedModel(float_model, layers, output_ranges)


def plan_from_mapping(names: list[str], mapping: Mapping[str, bool] | None) -> dict[str, bool]:
    """A full plan over ``names``: unspecified layers are quantized."""
    mapping = mapping or {}
    return {name: bool(mapping.get(name, True)) for name in names}
