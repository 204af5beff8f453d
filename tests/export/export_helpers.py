"""Small hand-written models, hand-made records, and ONNX/ORT helpers for the export tests."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from amct_opt.layers import QUANTIZABLE_TYPES, weight_channel_axis
from amct_opt.quant_model import QuantizedModel, build_quantized_model
from amct_opt.types import LayerQuantFactors, Record

# -- models --------------------------------------------------------------------------------


def conv_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups), nn.ReLU6())


class ConvStack(nn.Module):
    """Conv2d+ReLU6 stacks, a depthwise conv, global pooling and a Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_relu6(3, 16),
            conv_relu6(16, 16, groups=16),
            conv_relu6(16, 24, 1),
            conv_relu6(24, 24, stride=2),
        )
        self.classifier = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project, residual add."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.conv = nn.Sequential(
            conv_relu6(channels, hidden, 1),
            conv_relu6(hidden, hidden, groups=hidden),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class MobileNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_relu6(3, 16, stride=2)
        self.block1 = InvertedResidual(16)
        self.block2 = InvertedResidual(16)
        self.head = conv_relu6(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Branches(nn.Module):
    """One ReLU output read by two quantized convs (their input quantizer must be shared)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 1)
        self.right = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        return torch.cat([torch.relu(self.left(y)), torch.relu(self.right(y))], 1)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


class ConvTransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.out = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.up(torch.relu(self.conv(x)))))


class Mlp(nn.Module):
    """Linear on 2-D input (Gemm), one without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 32, bias=False)
        self.fc3 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Encoder(nn.Module):
    """A transformer-like block: Linear on 3-D input (the MatMul path), attention, FFN."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ff1 = nn.Linear(dim, 2 * dim)
        self.ff2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5
        x = self.norm(x + self.o(torch.softmax(scores, -1) @ self.v(x)))
        return x + self.ff2(nn.functional.gelu(self.ff1(x)))


# -- records -------------------------------------------------------------------------------


def activation_factors(lo: float, hi: float, symmetric: bool = False) -> tuple[float, int]:
    """int8 (scale, offset) over [lo, hi] widened to include 0: asymmetric, or symmetric offset 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return max(max(-lo, hi) / 127.0, 1e-8), 0
    scale = max((hi - lo) / 255.0, 1e-8)
    return scale, int(np.clip(-round(lo / scale) - 128, -128, 127))


def weight_factors(module: nn.Module, per_channel: bool) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Symmetric int8 weight scales max|w_c| / 127, per output channel or per tensor."""
    w = module.weight.detach()
    if not per_channel:
        return (max(float(w.abs().max()) / 127.0, 1e-8),), (0,)
    axis = weight_channel_axis(module)
    scales = w.abs().amax(dim=[d for d in range(w.dim()) if d != axis]) / 127.0
    return tuple(float(s) for s in scales.clamp_min(1e-8)), (0,) * len(scales)


def calibrate(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    per_channel_linear: bool = True,
    symmetric: bool = False,
) -> Record:
    """A record from the real min/max of each quantizable layer's input on ``inputs``."""
    ranges: dict[str, tuple[float, float]] = {}
    layers = {n: m for n, m in model.named_modules() if type(m) in QUANTIZABLE_TYPES}

    def observe(name: str, _m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        lo, hi = float(args[0].min()), float(args[0].max())
        old = ranges.get(name, (lo, hi))
        ranges[name] = (min(old[0], lo), max(old[1], hi))

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: observe(n, m, a)) for n, m in layers.items()]
    with torch.no_grad():
        model.eval()(*inputs)
    for handle in handles:
        handle.remove()
    record: Record = {}
    for name, module in layers.items():
        per_channel = per_channel_linear or not isinstance(module, nn.Linear)
        scale_d, offset_d = activation_factors(*ranges[name], symmetric=symmetric)
        record[name] = LayerQuantFactors(scale_d, offset_d, *weight_factors(module, per_channel))
    return record


def quantize(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    float_layers: Sequence[str] = (),
    per_channel_linear: bool = True,
    symmetric: bool = False,
) -> QuantizedModel:
    """``build_quantized_model`` on a copy of ``model``, with ``float_layers`` switched to float."""
    model = copy.deepcopy(model).eval()
    qmodel = build_quantized_model(model, calibrate(model, inputs, per_channel_linear, symmetric))
    qmodel.set_plan({name: False for name in float_layers})
    return qmodel.eval()


# -- ONNX / ORT ----------------------------------------------------------------------------


def session(path: Path, threads: int = 1, fused: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_ort(path: Path, *inputs: torch.Tensor, fused: bool = True) -> np.ndarray:
    """Run ``path`` in ORT.  ``fused=False`` runs the graph as written, node by node.

    Unfused, a deploy model's QuantizeLinear/DequantizeLinear run as such, so its
    outputs are the model's exact quantized arithmetic.  Fused, ORT's integer
    kernels compute them; on x86 CPUs without VNNI those multiply u8 by s8 with
    VPMADDUBSW, whose int16 pair sums can saturate (a known ORT/MLAS property,
    microsoft/onnxruntime#16105), so outputs may differ there by more than a step.
    """
    sess = session(path, fused=fused)
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})[0]


def torch_out(qmodel: nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return qmodel(*inputs).numpy()


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weight_source(model: onnx.ModelProto, node: onnx.NodeProto) -> str:
    """The initializer a compute node's weight comes from, through Q/DQ/Transpose or Div/Round/Clip/Mul."""
    made_by = producers(model)
    name = node.input[1]
    passes = ("QuantizeLinear", "DequantizeLinear", "Transpose", "Mul", "Min", "Max", "Clip", "Round", "Div")
    while name in made_by and made_by[name].op_type in passes:
        name = made_by[name].input[0]
    return name


def layer_node(model: onnx.ModelProto, layer: str) -> onnx.NodeProto:
    """The Conv/Gemm/MatMul computing the wrapped layer ``layer`` (found by its weight's name)."""
    prefix = f"model.{layer}.module.weight"
    found = [
        n for n in model.graph.node if n.op_type in COMPUTE_OPS and weight_source(model, n).startswith(prefix)
    ]
    assert len(found) == 1, (layer, [n.name for n in found])
    return found[0]
