"""Calibration: observers on every enabled layer's input, driven by the user's own loop.

The same pass also calibrates each layer's output range, which the deploy export
needs where it requantizes a convolution's output (before an Add, a pooling or
the graph output): one pass of the user's ``calibration()`` gives both.  A
convolution's output range comes from an observer of the layer's own activation
algorithm (IFMR or HFMG, as its input's), so that requantizer clips outliers as
every other activation quantizer does; for the other layers it is the min/max seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .errors import CalibrationError
from .layers import weight_channel_axis
from .fake_quant import QMAX, QMIN
from .observers import arq_quantize, make_activation_observer
from .types import LayerQuantFactors, OutputRange, OutputRanges, Record

__all__ = [
    "Calibration",
    "Calibrator",
    "calibrate",
    "calibrate_layers",
    "quantizer_range",
    "requantizes_output",
    "weight_is_channel_wise",
    "widen_output_range",
]

CalibrationFn = Callable[[nn.Module], Any]


def weight_is_channel_wise(module: nn.Module, channel_wise: bool) -> bool:
    """Grouped transposed convs have no clean output-channel axis: they use one scale."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups > 1:
        return False
    return channel_wise


def requantizes_output(module: nn.Module) -> bool:
    """True for a layer whose quantized output the deploy model may requantize: a (non-transposed) Conv."""
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def quantizer_range(scale: float, offset: int) -> OutputRange:
    """The real values an int8 quantizer ``(scale, offset)`` represents: [(-128 - offset) * scale, ...]."""
    return OutputRange((QMIN - offset) * scale, (QMAX - offset) * scale)


def widen_output_range(ranges: OutputRanges, name: str, out: Any) -> None:
    """Widen ``ranges[name]`` (which always holds 0) to the min and max of the tensor ``out``."""
    if isinstance(out, torch.Tensor) and out.numel():
        lo, hi = torch.aminmax(out.detach())
        seen = OutputRange(min(0.0, float(lo)), max(0.0, float(hi)))
        old = ranges.get(name)
        ranges[name] = seen if old is None else old.union(seen)


@dataclass(frozen=True)
class Calibration:
    """What one calibration pass found: the record's factors and each layer's output range."""

    record: Record
    output_ranges: OutputRanges


class Calibrator:
    """Observes the inputs (and output ranges) of ``config``'s enabled layers while attached to ``model``."""

    def __init__(self, model: nn.Module, config: QuantConfig) -> None:
        self.model = model
        self.config = config
        self.layers = {name: model.get_submodule(name) for name in config.enabled_layers()}
        self.observers = {
            name: make_activation_observer(config.layers[name].activation) for name in self.layers
        }
        self.output_observers = {
            name: make_activation_observer(config.layers[name].activation)
            for name, module in self.layers.items()
            if requantizes_output(module)
        }
        #: Min/max of every layer's output so far; :meth:`finalize` puts the observers' ranges in.
        self.output_ranges: OutputRanges = {}
        self.batches = 0
        self._handles: list[Any] = []

    def _count(self, _mod: nn.Module, _args: Any) -> None:
        self.batches += 1

    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._count))
        for name, module in self.layers.items():

            def observe(_mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                self.observers[name].update(args[0].detach())

            def observe_output(_mod: nn.Module, _args: Any, out: Any, name: str = name) -> None:
                widen_output_range(self.output_ranges, name, out)
                if name in self.output_observers and isinstance(out, torch.Tensor):
                    self.output_observers[name].update(out.detach())

            self._handles.append(module.register_forward_pre_hook(observe))
            self._handles.append(module.register_forward_hook(observe_output))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def finalize(self) -> Record:
        """The factors of every layer; raises when too little data was seen.

        Also sets the convolutions' :attr:`output_ranges` from their output observers.
        """
        if self.batches < self.config.batch_num:
            raise CalibrationError(
                f"model_evaluator.calibration: ran {self.batches} batch(es), but the config's "
                f"batch_num is {self.config.batch_num}; run at least batch_num forward passes"
            )
        record: Record = {}
        for name, module in self.layers.items():
            observer = self.observers[name]
            if observer.batches == 0:
                raise CalibrationError(
                    f"model_evaluator.calibration: layer {name!r} never ran; every quantized layer "
                    "must be reached by the calibration batches (or set its quant_enable to false)"
                )
            scale_d, offset_d = observer.compute()
            channel_wise = weight_is_channel_wise(module, self.config.layers[name].weight.channel_wise)
            scale_w, offset_w = arq_quantize(
                module.get_parameter("weight").detach(), channel_wise, weight_channel_axis(module),
                self.config.layers[name].weight.num_bits,
            )
            record[name] = LayerQuantFactors(scale_d, offset_d, scale_w, offset_w)
        for name, observer in self.output_observers.items():
            self.output_ranges[name] = quantizer_range(*observer.compute())
        return record


def calibrate_layers(model: nn.Module, config: QuantConfig, run_calibration: CalibrationFn) -> Calibration:
    """Run ``run_calibration(model)`` once with observers attached; return the factors and output ranges.

    ``model`` is the folded float copy.  Every enabled layer must run at least
    once, and the model must be called at least ``config.batch_num`` times.
    """
    calibrator = Calibrator(model, config)
    calibrator.attach()
    try:
        with torch.no_grad():
            run_calibration(model)
    finally:
        calibrator.detach()
    return Calibration(calibrator.finalize(), dict(calibrator.output_ranges))


def calibrate(model: nn.Module, config: QuantConfig, run_calibration: CalibrationFn) -> Record:
    """:func:`calibrate_layers`, the factors only."""
    return calibrate_layers(model, config, run_calibration).record
