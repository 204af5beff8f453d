"""Calibration: observers on every enabled layer's input, driven by the user's own loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .errors import CalibrationError
from .observers import arq_quantize, make_activation_observer
from .types import LayerQuantFactors, Record

__all__ = ["calibrate", "weight_is_channel_wise"]

CalibrationFn = Callable[[nn.Module], Any]


def weight_is_channel_wise(module: nn.Module, channel_wise: bool) -> bool:
    """Grouped transposed convs have no clean output-channel axis: they use one scale."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups > 1:
        return False
    return channel_wise


def calibrate(model: nn.Module, config: QuantConfig, run_calibration: CalibrationFn) -> Record:
    """Run ``run_calibration(model)`` once with observers attached; return the factors.

    ``model`` is the folded float copy. Every enabled layer must run at least
    once, and the model must be called at least ``config.batch_num`` times.
    """
    layers = {name: model.get_submodule(name) for name in config.enabled_layers()}
    observers = {name: make_activation_observer(config.layers[name].activation) for name in layers}
    batches = 0

    def count(_mod: nn.Module, _args: Any) -> None:
        nonlocal batches
        batches += 1

    handles = [model.register_forward_pre_hook(count)]
    for name, module in layers.items():

        def observe(_mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            observers[name].update(args[0].detach())

        handles.append(module.register_forward_pre_hook(observe))
    try:
        with torch.no_grad():
            run_calibration(model)
    finally:
        for handle in handles:
            handle.remove()

    if batches < config.batch_num:
        raise CalibrationError(
            f"model_evaluator.calibration: ran {batches} batch(es), but the config's "
            f"batch_num is {config.batch_num}; run at least batch_num forward passes"
        )
    record: Record = {}
    for name, module in layers.items():
        observer = observers[name]
        if observer.batches == 0:
            raise CalibrationError(
                f"model_evaluator.calibration: layer {name!r} never ran; every quantized layer "
                "must be reached by the calibration batches (or set its quant_enable to false)"
            )
        scale_d, offset_d = observer.compute()
        params = config.layers[name].weight
        axis = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
        scale_w, offset_w = arq_quantize(
            module.weight.detach(), weight_is_channel_wise(module, params.channel_wise), axis
        )
        record[name] = LayerQuantFactors(scale_d, offset_d, scale_w, offset_w)
    return record
