"""ONNX Runtime helpers shared by the examples: float export, sessions, latency."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

__all__ = ["export_float_onnx", "median_latencies", "session", "run_session"]


def export_float_onnx(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> Path:
    """Export the fp32 model with the TorchScript exporter (``dynamo=False``), atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(
                model.eval(),
                args,
                tmp,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                dynamo=False,
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def session(path: str | os.PathLike[str], threads: int = 2) -> ort.InferenceSession:
    """A CPU session with all graph optimisations and ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess: ort.InferenceSession, *inputs: torch.Tensor) -> torch.Tensor:
    """Run ``sess`` on torch tensors (in input order); return its first output as a tensor."""
    feeds = {meta.name: x.numpy() for meta, x in zip(sess.get_inputs(), inputs, strict=True)}
    return torch.from_numpy(np.asarray(sess.run(None, feeds)[0]))


def median_latencies(
    sessions: Sequence[ort.InferenceSession], inputs: Sequence[torch.Tensor], runs: int = 30, warmup: int = 5
) -> list[float]:
    """Median wall time (s) of each session on ``inputs``; calls are interleaved so load affects all alike."""
    feeds = [{meta.name: x.numpy() for meta, x in zip(s.get_inputs(), inputs, strict=True)} for s in sessions]
    for _ in range(warmup):
        for sess, feed in zip(sessions, feeds):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for sess, feed, record in zip(sessions, feeds, times):
            start = time.perf_counter()
            sess.run(None, feed)
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]
