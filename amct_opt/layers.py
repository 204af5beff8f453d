"""Which modules amct_opt quantizes, and along which weight axis."""

from __future__ import annotations

from torch import nn

__all__ = ["QUANTIZABLE_TYPES", "find_quantizable_layers", "weight_channel_axis", "is_conv"]

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.Linear,
)


def find_quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantizable modules by qualified name, in ``named_modules`` order.

    A module registered under several names is reported once, under its first name.
    """
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if type(module) in QUANTIZABLE_TYPES and id(module) not in seen:
            seen.add(id(module))
            found[name] = module
    return found


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def weight_channel_axis(module: nn.Module) -> int:
    """The weight axis of output channels: 1 for transposed convs, else 0."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1
    return 0
