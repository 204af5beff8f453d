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
from .layers import is_conv, weight_channel_axis
from .requant import contains, requant_params, requant_sites
from .types import LayerQuantFactors, OutputRanges, Plan, Record

__all__ = ["NUMERICS", "QuantLayer", "QuantizedModel", "build_quantized_model"]

#: What the fake-quant model computes, in one word; part of a study's fingerprint, so that
#: evaluations stored under other numerics are not reused.  2: the deploy model's output
#: requantizers and int32-rounded conv biases are simulated.
NUMERICS = "2"


class QuantLayer(nn.Module):
    """A Conv/Linear layer with INT8 fake quantization of its input and weight.

    Attributes:
        name: the wrapped layer's qualified name in the original model.
        module: the float layer (BN already folded in).
        factors: its quantization factors.
        weight_axis: the weight's output-channel axis (per-channel scales), or
            ``None`` when one per-tensor scale is used.
        quant_enabled: when False the layer runs exactly as the float layer.
        requant: ``(scale, zero_point)`` of the quantizer the deploy model puts on
            this Conv's output where no layer reads it (see :mod:`amct_opt.requant`),
            applied to the quantized output; None when there is none.
        requant_readers: the quantized layers whose input quantizer the deploy
            model also applies to this Conv's output for its other readers (an
            Add, a pooling), the first one's parameters; applied while all of
            them are quantized.
    """

    def __init__(self, name: str, module: nn.Module, factors: LayerQuantFactors) -> None:
        super().__init__()
        self.name = name
        self.module = module
        self.factors = factors
        self.quant_enabled = True
        self.requant: tuple[float, int] | None = None
        self.requant_readers: tuple[QuantLayer, ...] = ()  # a tuple: not registered as submodules
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
            #: The module's parameters the fake quant replaces, each by the buffer ``fq_<name>``.
            self.quantized_params: tuple[str, ...] = ("weight",)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and is_conv(module) and not module.transposed:
                self.register_buffer("fq_bias", self._int32_bias(bias.detach()))
                self.quantized_params = ("weight", "bias")

    def _fake_quant_weight(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        scale_w, offset_w = self.get_buffer("scale_w"), self.get_buffer("offset_w")
        if self.weight_axis is None:
            out = fake_quant(w, scale_w[0], offset_w[0])
        else:
            out = fake_quant_per_channel(w, scale_w, offset_w, self.weight_axis)
        return out.to(weight.dtype)

    def _int32_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The bias as the deploy model stores it: int32 at scale ``scale_d * scale_w``, dequantized.

        Computed in float32 as the export does, so that the torch model adds the
        bias ONNX Runtime's integer kernels add.
        """
        scale = self.get_buffer("scale_d") * self.get_buffer("scale_w")
        b = bias.float()
        if scale.numel() not in (1, b.numel()):
            return bias
        limit = float(torch.iinfo(torch.int32).max)
        return (torch.clamp(torch.round(b / scale), -limit - 1, limit) * scale).to(bias.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x.float(), self.get_buffer("scale_d"), self.get_buffer("offset_d")).to(x.dtype)

    def set_requant(self, params: tuple[float, int] | None) -> None:
        """Simulate the deploy model's requantizer ``(scale, zero_point)`` on the output (None: none)."""
        self.requant = None if params is None else (float(params[0]), int(params[1]))
        device = self.get_buffer("scale_d").device
        scale, zero_point = self.requant or (1.0, 0)
        self.register_buffer("scale_out", torch.tensor(scale, device=device, dtype=torch.float32))
        self.register_buffer("offset_out", torch.tensor(float(zero_point), device=device, dtype=torch.float32))

    def output_requant(self) -> tuple[float, int] | None:
        """The output requantizer in force for the current plan (this layer quantized), or None."""
        if self.requant is not None:
            return self.requant
        if self.requant_readers and all(r.quant_enabled for r in self.requant_readers):
            source = self.requant_readers[0]
            return float(source.get_buffer("scale_d")), int(source.get_buffer("offset_d"))
        return None

    def requantize_output(self, y: torch.Tensor) -> torch.Tensor:
        if self.requant is not None:
            scale, offset = self.get_buffer("scale_out"), self.get_buffer("offset_out")
        elif self.requant_readers and all(r.quant_enabled for r in self.requant_readers):
            source = self.requant_readers[0]
            scale, offset = source.get_buffer("scale_d"), source.get_buffer("offset_d")
        else:
            return y
        return fake_quant(y.float(), scale, offset).to(y.dtype)

    def quant_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The fake-quant computation, whatever ``quant_enabled`` says."""
        quantized = {name: self.get_buffer(f"fq_{name}") for name in self.quantized_params}
        y = functional_call(self.module, quantized, (self.quantize_input(x), *args), kwargs)
        return self.requantize_output(y)

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
    :class:`amct_opt.calibration.Calibration`).  With them, each Conv whose
    output no layer reads simulates the deploy model's requantizer on it (see
    :mod:`amct_opt.requant`).

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
    _simulate_requantizers(float_model, layers, output_ranges or {})
    return QuantizedModel(float_model, layers, output_ranges)


def _simulate_requantizers(model: nn.Module, layers: dict[str, QuantLayer], output_ranges: OutputRanges) -> None:
    """Give each Conv the output requantizer the deploy model will add (see :mod:`amct_opt.requant`)."""
    for name, site in requant_sites(model, layers).items():
        if not site.readers:
            if name in output_ranges:
                layers[name].set_requant(requant_params(output_ranges[name], site.bounds))
            continue
        readers = tuple(layers[r] for r in site.readers)
        first = readers[0].factors
        same = all((r.factors.scale_d, r.factors.offset_d) == (first.scale_d, first.offset_d) for r in readers)
        # Readers with different input quantizers, or one whose range passes the activation's, are
        # treated otherwise by the deploy model (it warns where the two then differ).
        if same and contains(site.bounds, first.scale_d, first.offset_d):
            layers[name].requant_readers = readers


def plan_from_mapping(names: list[str], mapping: Mapping[str, bool] | None) -> dict[str, bool]:
    """A full plan over ``names``: unspecified layers are quantized."""
    mapping = mapping or {}
    return {name: bool(mapping.get(name, True)) for name in names}
