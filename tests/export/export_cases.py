"""The hand-written export test cases, each quantized and exported once per session by :func:`exported`."""

from __future__ import annotations

import atexit
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from export_helpers import (
    Branches,
    Conv1dNet,
    ConvStack,
    ConvTransposeNet,
    Encoder,
    Mlp,
    MobileNetLike,
    quantize,
)
from torch import nn

from amct_opt.export import ExportedModels, export_models
from amct_opt.quant_model import QuantizedModel


@dataclass(frozen=True)
class Case:
    """A model, its input shape, and how to quantize it."""

    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    float_layers: tuple[str, ...] = ()
    per_channel_linear: bool = True
    symmetric: bool = False
    dynamic_batch: bool = True


CASES: dict[str, Case] = {
    "conv_stack": Case(ConvStack, (3, 16, 16)),
    "mobilenet_like": Case(MobileNetLike, (3, 16, 16), per_channel_linear=False),
    "branches": Case(Branches, (3, 8, 8)),
    "conv1d": Case(Conv1dNet, (4, 12)),
    "conv_transpose": Case(ConvTransposeNet, (4, 6, 6)),
    "mlp": Case(Mlp, (20,), per_channel_linear=False),
    "encoder": Case(Encoder, (7, 32)),
    "encoder_static": Case(Encoder, (7, 32), dynamic_batch=False),
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


_WORKDIR = tempfile.TemporaryDirectory(prefix="amct_opt_export_tests_")
atexit.register(_WORKDIR.cleanup)


@functools.cache
def exported(name: str) -> Exported:
    """The case ``name`` quantized (records from real min/max) and exported, once per test session."""
    return export_case(name, Path(_WORKDIR.name) / name)


def export_case(name: str, prefix: Path) -> Exported:
    """The case ``name`` quantized and exported to ``prefix`` now (see :func:`exported`)."""
    case = CASES[name]
    torch.manual_seed(0)
    model = case.make().eval()
    calibration = torch.randn(16, *case.shape)
    test = torch.randn(32 if case.dynamic_batch else 2, *case.shape)
    qmodel = quantize(model, (calibration,), case.float_layers, case.per_channel_linear, case.symmetric)
    paths = export_models(
        qmodel,
        prefix,
        (calibration[:2],),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if case.dynamic_batch else None,
        calibration=lambda m: m(calibration),
    )
    return Exported(qmodel, calibration, test, paths)
