"""What ONNX Runtime makes of an exported model: its optimized graph and the op types in it."""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort  # type: ignore[import-untyped]

__all__ = ["INTEGER_OPS", "op_counts", "optimized_model"]

#: Op types of ORT's integer kernels for convolutions and matrix products.
INTEGER_OPS = frozenset(
    {"QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "ConvInteger"}
)


def optimized_model(
    path: str | os.PathLike[str],
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
) -> onnx.ModelProto:
    """The graph ORT's CPU provider runs for ``path`` (``SessionOptions.optimized_model_filepath``)."""
    with tempfile.TemporaryDirectory(prefix="amct_opt_ort_") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def op_counts(model: onnx.ModelProto) -> collections.Counter[str]:
    """How many nodes of each op type ``model``'s top-level graph has."""
    return collections.Counter(node.op_type for node in model.graph.node)
