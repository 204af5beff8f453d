"""The public export functions."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from ..errors import InputError
from ..quant_model import QuantizedModel
from ._deploy import to_deploy_model, to_fake_quant_model
from ._names import DynamicAxes, check_dynamic_axes
from ._save import save_model
from ._trace import observe_output_ranges, quant_export_mode, trace_to_onnx

__all__ = [
    "ExportedModels",
    "export_deploy_model",
    "export_fake_quant_model",
    "export_float_model",
    "export_models",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Batch = tuple[Any, ...]
#: Runs representative batches through the model it is given, e.g. an evaluator's ``calibration``.
Calibration = Callable[[torch.nn.Module], Any]


@dataclass(frozen=True)
class ExportedModels:
    """Paths of the two files written by :func:`export_models`."""

    fake_quant_path: Path
    deploy_path: Path


def _check_qmodel(qmodel: Any) -> None:
    if not isinstance(qmodel, QuantizedModel):
        raise InputError(f"qmodel: expected a QuantizedModel, got {type(qmodel).__name__}")


def _as_batch(input_data: Any) -> Batch:
    if isinstance(input_data, torch.Tensor):
        return (input_data,)
    if not isinstance(input_data, (tuple, list)) or not input_data:
        raise InputError(
            f"input_data: expected a non-empty tuple of model inputs, got {type(input_data).__name__}"
        )
    return tuple(input_data)


def _trace(
    qmodel: QuantizedModel,
    data: Batch,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_axes: DynamicAxes | None,
    calibration: Calibration | None,
    deploy: bool,
) -> onnx.ModelProto:
    """Trace ``qmodel``; for a deploy model, first find its layers' output ranges.

    The ranges calibrated with the record (``qmodel.output_ranges``) are used as
    they are.  An enabled layer without one gets the min/max of its output while
    ``qmodel`` runs ``calibration``, or ``data`` when no ``calibration`` is given.
    """
    ranges = None
    if deploy:
        ranges = dict(qmodel.output_ranges)
        missing = [n for n, layer in qmodel.layers().items() if layer.quant_enabled and n not in ranges]
        if missing:

            def run(model: torch.nn.Module) -> None:
                if calibration is not None:
                    calibration(model)
                else:
                    model(*data)

            seen = observe_output_ranges(qmodel, run)
            ranges.update({name: seen[name] for name in missing if name in seen})
    with quant_export_mode(qmodel, ranges):
        return trace_to_onnx(qmodel, data, input_names, output_names, dynamic_axes, markers=True)


def export_float_model(
    model: torch.nn.Module,
    path: PathLike,
    input_data: Batch,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes | None = None,
) -> None:
    """Write ``model`` as a plain float ONNX model (same exporter settings), atomically."""
    check_dynamic_axes(dynamic_axes, input_names, output_names)
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    data = _as_batch(input_data)
    save_model(trace_to_onnx(model, data, input_names, output_names, dynamic_axes), path)
    logger.info("wrote float model %s", path)


def export_fake_quant_model(
    qmodel: QuantizedModel,
    path: PathLike,
    input_data: Batch,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes | None = None,
) -> None:
    """Write the fake-quant ONNX model of ``qmodel``'s current plan to ``path``.

    Float weights and activations, each quantizer written as the arithmetic of
    QuantizeLinear -> DequantizeLinear in Div/Round/Clip/Mul (per-channel scales
    for weights), exactly where the torch fake quant is: ORT cannot fuse it into
    integer kernels (QLinearConv, MatMulNBits ...) and reproduces
    :class:`QuantizedModel`'s outputs on any CPU.  Layers switched to float have no quantizer.  ``input_names``,
    ``output_names`` and ``dynamic_axes`` mean what they mean to
    ``torch.onnx.export``.  The file is written atomically.
    """
    check_dynamic_axes(dynamic_axes, input_names, output_names)
    _check_qmodel(qmodel)
    data = _as_batch(input_data)
    model = _trace(qmodel, data, input_names, output_names, dynamic_axes, None, deploy=False)
    save_model(to_fake_quant_model(model), path)
    logger.info("wrote fake-quant model %s", path)


def export_deploy_model(
    qmodel: QuantizedModel,
    path: PathLike,
    input_data: Batch,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes | None = None,
    calibration: Calibration | None = None,
) -> None:
    """Write the int8 deploy ONNX model of ``qmodel``'s current plan to ``path``.

    Standard QDQ ONNX laid out for ONNX Runtime's integer kernels: int8 weight
    initializers + DequantizeLinear (per-channel for convolutions), int32 biases,
    shared activation quantizers, uint8 activations (zero point + 128, the same
    values), and an output QuantizeLinear on every quantized Conv.  A quantizer
    after a Relu/ReLU6 whose range reaches below 0 (offset 0) is cut to the
    activation's range, so that ORT can drop the activation and fuse the Conv.

    Where a quantized Conv's output is not already read by a quantizer (it feeds
    an Add, a pooling or the graph output), that output is requantized with the
    layer's output range calibrated with the record (``qmodel.output_ranges``:
    the layer's activation algorithm, IFMR or HFMG, on its output; see
    :mod:`amct_opt.calibration`).  A layer without one (a ``QuantizedModel``
    built without ``output_ranges``) uses the min/max of its output while
    ``calibration(qmodel)`` runs if it is given (e.g. the evaluator's
    ``calibration``), else on ``input_data``.  Those requantizers are the deploy model's one numerical difference
    from the fake-quant model, besides int32 biases.  A quantized Conv read by a
    layer kept float, and every quantized ConvTranspose, runs a float kernel on
    its constant dequantized weight: the same values, without ORT dequantizing the
    weight on every run.
    """
    check_dynamic_axes(dynamic_axes, input_names, output_names)
    _check_qmodel(qmodel)
    data = _as_batch(input_data)
    model = _trace(qmodel, data, input_names, output_names, dynamic_axes, calibration, deploy=True)
    save_model(to_deploy_model(model), path)
    logger.info("wrote deploy model %s", path)


def export_models(
    qmodel: QuantizedModel,
    prefix_path: PathLike,
    input_data: Batch,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes | None = None,
    calibration: Calibration | None = None,
) -> ExportedModels:
    """Write ``<prefix>_fake_quant_model.onnx`` and ``<prefix>_deploy_model.onnx`` from one trace.

    See :func:`export_fake_quant_model` and :func:`export_deploy_model` (for
    ``calibration``).  Both models are built before either file is written.

    Example:
        >>> paths = export_models(qmodel, "results/mobilenet", (images,),
        ...                       input_names=["input"], output_names=["logits"],
        ...                       dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        ...                       calibration=evaluator.calibration)
    """
    check_dynamic_axes(dynamic_axes, input_names, output_names)
    _check_qmodel(qmodel)
    data = _as_batch(input_data)
    traced = _trace(qmodel, data, input_names, output_names, dynamic_axes, calibration, deploy=True)
    fake_quant = to_fake_quant_model(copy.deepcopy(traced))
    deploy = to_deploy_model(traced)
    prefix = os.fspath(prefix_path)
    paths = ExportedModels(Path(f"{prefix}_fake_quant_model.onnx"), Path(f"{prefix}_deploy_model.onnx"))
    save_model(fake_quant, paths.fake_quant_path)
    save_model(deploy, paths.deploy_path)
    logger.info("wrote %s and %s", paths.fake_quant_path, paths.deploy_path)
    return paths
