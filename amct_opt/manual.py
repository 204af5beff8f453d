"""The reference's manual PTQ path: ``quantize_model``, run batches, ``save_model``.

``quantize_model`` validates the config, folds Conv+BN into a private copy of
the model, attaches calibration observers and writes the folded float model to
``modified_onnx_file``.  The user runs calibration batches on the returned
model; ``save_model`` turns what was observed into the record file, the two
ONNX models and ``<save_path>_quant.json`` (what was folded into what, see
:func:`amct_opt.fusion.fusion_info`).  The calibration session is kept in this
process, keyed by ``modified_onnx_file``; a ``save_model`` that fails for too
few batches leaves it open, so more batches and a second ``save_model`` work.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import Calibrator
from .config import QuantConfig
from .errors import InputError, UnsupportedModelError
from . import __version__
from ._io import atomic_write_json
from .fusion import FusionPair, fold_conv_bn, fusion_info, pairs_to_fold
from .layers import find_quantizable_layers
from .outputs import as_input_tuple, check_writable_dir
from .quant_model import build_quantized_model
from .record import write_record

__all__ = ["quantize_model", "save_model"]


@dataclass
class _Session:
    model: nn.Module
    calibrator: Calibrator
    inputs: tuple[Any, ...]
    input_names: list[str] | None
    output_names: list[str] | None
    dynamic_axes: dict[str, Any] | None
    fusions: list[FusionPair] = field(default_factory=list)


_SESSIONS: dict[str, _Session] = {}


def _key(path: Any, argument: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InputError(f"{argument}: expected a file path, got {path!r}")
    return str(Path(path).resolve())


def quantize_model(
    config_file: str,
    modified_onnx_file: str,
    record_file: str,
    model: nn.Module,
    input_data: Any,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, Any] | None = None,
) -> nn.Module:
    """Return a calibration model: run at least ``batch_num`` batches through it, then call
    :func:`save_model`."""
    from .export import check_dynamic_axes, export_float_model

    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = find_quantizable_layers(model)
    if not layers:
        raise UnsupportedModelError("model: no quantizable layer found")
    config = QuantConfig.load(config_file, model_layers=list(layers))
    inputs = as_input_tuple(input_data)
    key = _key(modified_onnx_file, "modified_onnx_file")
    check_writable_dir(Path(key).parent, "modified_onnx_file")
    check_writable_dir(Path(_key(record_file, "record_file")).parent, "record_file")
    check_dynamic_axes(dynamic_axes, input_names, output_names)
    pairs = pairs_to_fold(model, config)
    folded = fold_conv_bn(model, pairs)
    export_float_model(folded, key, inputs, input_names, output_names, dynamic_axes)
    previous = _SESSIONS.pop(key, None)
    if previous is not None:  # a second quantize_model on the same file starts afresh
        previous.calibrator.detach()
    calibrator = Calibrator(folded, config)
    calibrator.attach()
    _SESSIONS[key] = _Session(folded, calibrator, inputs, input_names, output_names, dynamic_axes, pairs)
    return folded


def save_model(modified_onnx_file: str, record_file: str, save_path: str) -> None:
    """Write the record file, ``<save_path>_fake_quant_model.onnx`` / ``_deploy_model.onnx``
    and ``<save_path>_quant.json``; every enabled layer is quantized.

    Raises :class:`~amct_opt.errors.CalibrationError` (and keeps the session open)
    when fewer than ``batch_num`` batches ran through the calibration model.
    """
    from .export import export_models

    key = _key(modified_onnx_file, "modified_onnx_file")
    session = _SESSIONS.get(key)
    if session is None:
        raise InputError(
            f"modified_onnx_file: {modified_onnx_file!r} was not made by quantize_model in this process"
        )
    if not isinstance(save_path, (str, os.PathLike)) or not Path(save_path).name:
        raise InputError(f"save_path: expected a folder plus a file-name prefix, got {save_path!r}")
    check_writable_dir(Path(save_path).resolve().parent, "save_path")
    check_writable_dir(Path(_key(record_file, "record_file")).parent, "record_file")
    record = session.calibrator.finalize()  # before detaching: on too few batches, the user may run more
    session.calibrator.detach()
    write_record(record_file, record)
    with torch.no_grad():  # wrap a copy: the calibration model handed to the user stays float
        qmodel = build_quantized_model(copy.deepcopy(session.model), record, session.calibrator.output_ranges)
    export_models(
        qmodel, str(save_path), session.inputs, session.input_names, session.output_names,
        session.dynamic_axes,
    )
    plan = {name: name in record for name in session.calibrator.config.layers}
    atomic_write_json(f"{os.fspath(save_path)}_quant.json", fusion_info(session.fusions, plan, __version__))
    del _SESSIONS[key]
