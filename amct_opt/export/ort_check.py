"""What ONNX Runtime makes of an exported model: its optimized graph and the op types in it."""

from __future__ import annotations

import collections
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort  # type: ignore[import-untyped]
from torch import nn

from ..layers import find_quantizable_layers, is_conv

__all__ = [
    "INTEGER_OPS",
    "VNNI_FLAGS",
    "cpu_flags",
    "median_latencies",
    "op_counts",
    "optimized_model",
    "saturation_safe_defination",
    "seven_bit_convolutions",
    "u8s8_kernels_may_saturate",
]

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


def median_latencies(
    sessions: Sequence[ort.InferenceSession],
    feeds: Sequence[Mapping[str, Any]],
    runs: int,
    warmup: int = 3,
    rounds: int = 5,
) -> list[float]:
    """Median wall time (s) of each session on its feed, over at least ``runs`` timed calls each.

    The sessions take turns in ``rounds`` blocks, so that a change in the machine's
    load affects them alike; each block starts with ``warmup`` untimed calls.
    Turns call by call would time each model against the previous one's intra-op
    threads, which spin for a while after a run and, on few cores, slow the next.
    """
    times: list[list[float]] = [[] for _ in sessions]
    per_block = -(-runs // rounds)
    for _ in range(rounds):
        for session, feed, record in zip(sessions, feeds, times, strict=True):
            for _ in range(warmup):
                session.run(None, feed)
            for _ in range(per_block):
                start = time.perf_counter()
                session.run(None, feed)
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def op_counts(model: onnx.ModelProto) -> collections.Counter[str]:
    """How many nodes of each op type ``model``'s top-level graph has."""
    return collections.Counter(node.op_type for node in model.graph.node)


#: CPU flags with which x86 u8s8 dot products accumulate in int32 (no int16 pair sums).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> list[str] | None:
    """The ``flags`` line of ``cpuinfo``; None where it cannot be read."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)


def u8s8_kernels_may_saturate(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU without VNNI: ORT's u8s8 kernels there sum u8 x s8 pairs in int16.

    ``VPMADDUBSW`` adds two u8 x s8 products with int16 saturation, so a pair of
    large activations times large same-sign 8-bit weights is clipped
    (microsoft/onnxruntime#16105).  Weights with ``num_bits`` 7 (in [-63, 63]) cannot
    overflow it.  False on other CPUs, and where the flags cannot be read.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = cpu_flags(cpuinfo)
    return flags is not None and not any(flag in flags for flag in VNNI_FLAGS)


def seven_bit_convolutions(model: nn.Module) -> dict[str, Any] | None:
    """A ``config_defination`` giving every convolution of ``model`` 7-bit weights; None if it has none."""
    convs = [name for name, module in find_quantizable_layers(model).items() if is_conv(module)]
    if not convs:
        return None
    return {"layers": {name: {"weight_quant_params": {"num_bits": 7}} for name in convs}}


def saturation_safe_defination(
    model: nn.Module, cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo"
) -> dict[str, Any] | None:
    """:func:`seven_bit_convolutions` where u8s8 kernels may saturate; None elsewhere.

    None on CPUs where they cannot (see :func:`u8s8_kernels_may_saturate`).  Only
    convolutions: ORT's u8s8 convolution kernel is where post-ReLU activations
    near 255 meet large weights; Linear layers keep 8 bits (measured on MiniLM:
    7-bit weights cost far more accuracy there than saturation does).  Pass it to
    :func:`amct_opt.create_quant_config` when the deploy machine is this one.
    """
    return seven_bit_convolutions(model) if u8s8_kernels_may_saturate(cpuinfo) else None
