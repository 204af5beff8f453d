"""Per-layer compute (MACs) and size (parameters), measured from a real forward pass."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .layers import find_quantizable_layers
from .types import LayerCost

__all__ = ["measure_layer_costs", "run_model"]


def run_model(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """Call ``model`` on ``inputs`` under ``no_grad``."""
    with torch.no_grad():
        return model(*inputs)


def _macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    assert isinstance(module, nn.modules.conv._ConvNd)
    kernel = math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return inp.numel() * (module.out_channels // module.groups) * kernel
    return out.numel() * (module.in_channels // module.groups) * kernel


def measure_layer_costs(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, LayerCost]:
    """MACs at the shape of ``inputs`` (summed over calls) and parameter counts per layer."""
    layers = find_quantizable_layers(model)
    macs = dict.fromkeys(layers, 0)
    handles = []
    for name, module in layers.items():

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            macs[name] += _macs(mod, args[0], out)

        handles.append(module.register_forward_hook(hook))
    try:
        run_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: LayerCost(macs=macs[name], params=sum(p.numel() for p in layers[name].parameters()))
        for name in layers
    }
