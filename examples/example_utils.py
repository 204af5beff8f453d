"""Helpers shared by the example scripts: output folder, final config, float ONNX export, ORT timing."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from amct_opt.export.ort_check import median_latencies as ort_median_latencies

__all__ = [
    "config_for_this_cpu",
    "export_float_onnx",
    "median_latencies",
    "run_session",
    "session",
    "setup_logging",
    "working_directory",
]

#: amct_opt exports its models at opset 17; the float baseline uses the same, for a fair timing.
ONNX_OPSET = 17


def setup_logging(quiet: bool) -> None:
    """Progress lines (amct_opt's included) on stderr at INFO, or only warnings when ``quiet``.

    Also hides the tracer warnings that ONNX export prints for the examples' static shapes.
    """
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", handlers=[handler])
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message="Exporting aten::index operator")


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block in ``path`` (created if missing): the reference writes ``amct_log/`` in the cwd."""
    path.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def config_for_this_cpu(model: nn.Module) -> dict[str, Any] | None:
    """A ``config_defination`` with 7-bit convolution weights where ORT's u8s8 kernels may saturate.

    The examples deploy on the machine they run on.  On an x86 CPU without VNNI,
    ONNX Runtime's integer convolutions sum u8 x s8 product pairs in int16, which
    8-bit weights can overflow; 7-bit weights cannot, so the deploy model then
    computes what the search evaluated.  None elsewhere (and for models without
    convolutions).
    """
    from amct_opt.export.ort_check import saturation_safe_defination

    defination = saturation_safe_defination(model)
    if defination is not None:
        logging.getLogger("examples").info(
            "this CPU has no VNNI: ONNX Runtime's u8s8 convolutions may saturate 8-bit weights, "
            "so the config gives the %d convolutions 7-bit weights (weight_quant_params.num_bits = 7)",
            len(defination["layers"]),
        )
    return defination


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
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
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
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
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
    sessions: Sequence[ort.InferenceSession], inputs: Sequence[torch.Tensor], runs: int = 30
) -> list[float]:
    """Median wall time (s) of each session on ``inputs`` (see :func:`amct_opt.export.ort_check.median_latencies`)."""
    feeds = [{meta.name: x.numpy() for meta, x in zip(s.get_inputs(), inputs, strict=True)} for s in sessions]
    return ort_median_latencies(sessions, feeds, runs)
