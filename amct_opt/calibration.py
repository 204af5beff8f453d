"""Calibration: observers on every enabled layer's input, driven by the user's own loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .errors import CalibrationError
from .layers import weight_channel_axis
from .observers import arq_quantize, make_activation_observer
from .types import LayerQuantFactors, Record

__all__ = ["Calibrator", "calibrate", "weight_is_channel_wise"]

CalibrationFn = Callable[[nn.Module], Any]


def weight_is_channel_wise(module: nn.Module, channel_wise: bool) -> bool:
    """Grouped transposed convs have no clean output-channel axis: they use one scale."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups > 1:
        return False
    return channel_wise


class Calibrator:
    """Observes the inputs of ``config``'s enabled layers while attached to ``model``."""

    def __init__(self, model: nn.Module, config: QuantConfig) -> None:
        self.model = model
        self.config = config
        self.layers = {name: model.get_submodule(name) for name in config.enabled_layers()}
        self.observers = {
            name: make_activation_observer(config.layers[name].activation) for name in self.layers
        }
        self.batches = 0
        self._handles: list[Any] = []

    def _count(self, _mod: nn.Module, _args: Any) -> None:
        self.batches += 1

    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._count))
        for name, module in self.layers.items():

            def observe(_mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                self.observers[name].update(args[0].detach())

            self._handles.append(module.register_forward_pre_hook(observe))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def finalize(self) -> Record:
        """The factors of every layer; raises when too little data was seen."""
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
                module.weight.detach(), channel_wise, weight_channel_axis(module)
            )
            record[name] = LayerQuantFactors(scale_d, offset_d, scale_w, offset_w)
        return record


def calibrate(model: nn.Module, config: QuantConfig, run_calibration: CalibrationFn) -> Record:
    """Run ``run_calibration(model)`` once with observers attached; return the factors.

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
    return calibrator.finalize()
