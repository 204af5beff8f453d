"""Atomic writing of ONNX models, with external data for models over protobuf's 2 GiB limit."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

from .._io import atomic_write_bytes
from ..errors import ExportError

__all__ = ["EXTERNAL_DATA_THRESHOLD", "save_model", "tensor_bytes"]

#: Models whose tensors hold at least this many bytes are saved with external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 1
#: Tensors smaller than this stay inside the .onnx file when external data is used.
_EXTERNAL_TENSOR_MIN_BYTES = 1024


def _graph_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                tensors.extend(_graph_tensors(sub))
    return tensors


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in ``model`` (initializers and constant attributes)."""
    return sum(t.ByteSize() for t in _graph_tensors(model.graph))


def _check(model: onnx.ModelProto | str, path: Path) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ExportError(f"{path}: the exported model fails onnx.checker: {exc}") from exc


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], external_data_threshold: int | None = None
) -> None:
    """Check ``model`` with ``onnx.checker`` and write it to ``path`` atomically.

    At or above ``external_data_threshold`` bytes of tensors (default
    :data:`EXTERNAL_DATA_THRESHOLD`), the tensors go to ``<path name>.data``
    beside it: both files are staged and checked in a temporary folder there,
    then renamed into place, the data first and the ``.onnx`` last.  Either way
    no half-written ``.onnx`` is ever left behind.  ``model`` is modified when
    external data is used.
    """
    target = Path(path)
    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    if tensor_bytes(model) < threshold:
        _check(model, target)
        atomic_write_bytes(target, model.SerializeToString())
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{target.name}.data"
    convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=data_name, size_threshold=_EXTERNAL_TENSOR_MIN_BYTES
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staged = Path(tmp) / target.name
        write_external_data_tensors(model, tmp)
        atomic_write_bytes(staged, model.SerializeToString())
        _check(str(staged), target)
        os.replace(Path(tmp) / data_name, target.parent / data_name)
        os.replace(staged, target)
