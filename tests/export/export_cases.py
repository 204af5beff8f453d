"""The hand-written export test cases: a model, its input shape, and how it is quantized."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from export_helpers import Branches, Conv1dNet, ConvStack, ConvTransposeNet, Encoder, Mlp, MobileNetLike
from torch import nn

from amct_opt.export import ExportedModels
from amct_opt.quant_model import QuantizedModel


@dataclass(frozen=True)
class Case:
    """A model, its input shape, and how to quantize it."""

    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    float_layers: tuple[str, ...] = ()
    per_channel_linear: bool = True
    symmetric: bool = False


CASES: dict[str, Case] = {
    "conv_stack": Case(ConvStack, (3, 16, 16)),
    "mobilenet_like": Case(MobileNetLike, (3, 16, 16), per_channel_linear=False),
    "branches": Case(Branches, (3, 8, 8)),
    "conv1d": Case(Conv1dNet, (4, 12)),
    "conv_transpose": Case(ConvTransposeNet, (4, 6, 6)),
    "mlp": Case(Mlp, (20,), per_channel_linear=False),
    "encoder": Case(Encoder, (7, 32)),
    "mixed_float": Case(MobileNetLike, (3, 16, 16), float_layers=("stem.0", "block1.conv.1.0", "fc")),
    "symmetric": Case(ConvStack, (3, 16, 16), symmetric=True),
}


@dataclass
class Exported:
    """One case after export: the quantized model, the data, and the two files."""

    qmodel: QuantizedModel
    calibration: torch.Tensor
    test: torch.Tensor
    paths: ExportedModels
    case: Case = field(repr=False)
