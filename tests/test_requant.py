"""requant: which Conv outputs the deploy model requantizes, and the fake-quant model simulating them."""

from __future__ import annotations

import copy
import logging
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "export"))
from export_helpers import MobileNetLike  # noqa: E402

from amct_opt.calibration import calibrate_layers  # noqa: E402
from amct_opt.config import QuantConfig  # noqa: E402
from amct_opt.create_config import create_quant_config  # noqa: E402
from amct_opt.export import export_models  # noqa: E402
from amct_opt.fake_quant import fake_quant, range_params  # noqa: E402
from amct_opt.quant_model import QuantizedModel, build_quantized_model  # noqa: E402
from amct_opt.requant import Bounds, Site, requant_params, requant_sites  # noqa: E402
from amct_opt.types import OutputRange  # noqa: E402


class Sites(nn.Module):
    """Every kind of reader of a conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.read = nn.Conv2d(3, 8, 3, padding=1)  # -> ReLU6 -> conv: read by a layer
        self.conv = nn.Conv2d(8, 8, 1)  # -> dropout -> + skip: nothing reads it
        self.act = nn.ReLU6()
        self.drop = nn.Dropout(0.1)
        self.pooled = nn.Conv2d(8, 8, 1)  # -> relu -> pooling
        self.clamped = nn.Conv2d(8, 8, 1)  # -> clamp(-1, 2) -> flatten -> fc
        self.fc = nn.Linear(8 * 4 * 4, 4)
        self.left_float = nn.Conv2d(8, 8, 1)  # -> an unwrapped (float) conv
        self.plain = nn.Conv2d(8, 8, 1)
        self.up = nn.ConvTranspose2d(8, 8, 1)  # transposed: never

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.read(x))
        z = y + self.drop(self.conv(y))
        p = nn.functional.adaptive_avg_pool2d(torch.relu(self.pooled(z)), 4)
        c = torch.flatten(torch.clamp(self.clamped(p), -1.0, 2.0), 1)
        return self.fc(c) + self.plain(self.left_float(p)).mean() + self.up(p).mean()


def _wrapped(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name) for name in names}


def test_the_requantized_conv_outputs_are_found_with_their_activation_range_and_readers() -> None:
    model = Sites().eval()
    names = ["read", "conv", "pooled", "clamped", "fc", "left_float", "up"]  # "plain" stays unwrapped
    found = requant_sites(model, _wrapped(model, names))
    assert found == {
        "read": Site(Bounds(0.0, 6.0), ("conv",)),  # its ReLU6 is read by "conv" and the Add
        "conv": Site(Bounds()),  # read by Dropout (exports to nothing), then the Add
        "pooled": Site(Bounds(0.0, math.inf)),
        "clamped": Site(Bounds(-1.0, 2.0)),
    }
    # "left_float" is read by a layer left unwrapped (float); "up" is transposed.


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return y
        return -y


def test_a_model_torch_fx_cannot_trace_simulates_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    model = Branching().eval()
    with caplog.at_level(logging.INFO, logger="amct_opt"):
        assert requant_sites(model, _wrapped(model, ["conv"])) == {}
    assert "torch.fx cannot trace Branching" in caplog.text


def test_a_layer_called_twice_is_not_simulated() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x) + 1.0)

    model = Twice().eval()
    assert requant_sites(model, _wrapped(model, ["conv"])) == {}


def test_requant_params_clamp_the_output_range_to_the_activation_range() -> None:
    scale, zero_point = requant_params(OutputRange(-3.0, 9.0), Bounds(0.0, 6.0))
    assert zero_point == -128 and scale == pytest.approx(6.0 / 255, rel=1e-6)
    assert np.float32(scale) * np.float32(127 - zero_point) <= np.float32(6.0)  # the ReLU6 stays redundant
    # No activation: the output range as it is; a range inside the bounds is not changed by them.
    assert requant_params(OutputRange(-2.0, 2.0), Bounds()) == range_params(-2.0, 2.0)
    assert requant_params(OutputRange(-0.5, 3.0), Bounds(-1.0, 6.0)) == range_params(-0.5, 3.0)


def _calibrated(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> QuantizedModel:
    config = tmp_path / "config.json"
    create_quant_config(str(config), model, (x[:2],), batch_num=1)
    calibration = calibrate_layers(model, QuantConfig.load(config), lambda m: m(x))
    return build_quantized_model(copy.deepcopy(model), calibration.record, calibration.output_ranges).eval()


def test_the_fake_quant_model_applies_the_requantizer_where_the_deploy_model_puts_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MobileNetLike().eval()
    x = torch.randn(16, 3, 16, 16)
    qmodel = _calibrated(model, x, tmp_path)
    simulated = {name for name, layer in qmodel.layers().items() if layer.requant is not None}
    # The project convs before the residual Adds, and the head conv before the pooling.
    assert simulated == {"block1.conv.2", "block2.conv.2", "head.0"}
    # The stem's output is read by block1's expand conv and its Add: the Add reads the conv's quantizer.
    stem, expand = qmodel.layer("stem.0"), qmodel.layer("block1.conv.0.0")
    assert stem.requant is None and stem.requant_readers == (expand,)
    assert stem.output_requant() == (float(expand.get_buffer("scale_d")), int(expand.get_buffer("offset_d")))
    expand.quant_enabled = False  # then the deploy's stem runs a float kernel: nothing to simulate
    assert stem.output_requant() is None
    expand.quant_enabled = True
    layer = qmodel.layer("block1.conv.2")
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        qmodel(x[:2])
        handle.remove()
        unrequantized = torch.nn.functional.conv2d(
            layer.quantize_input(seen[0]), layer.get_buffer("fq_weight"), layer.module.bias
        )
        scale, zero_point = layer.requant  # type: ignore[misc]
        expected = fake_quant(unrequantized, torch.tensor(scale), torch.tensor(float(zero_point)))
        assert torch.equal(layer(seen[0]), expected)
        layer.quant_enabled = False
        assert torch.equal(layer(seen[0]), layer.module(seen[0]))  # float: no requantizer


def _run(path: Path, x: torch.Tensor, fused: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_deploy_fake_quant_onnx_and_torch_compute_the_same_requantized_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the requantizers simulated, the fake-quant ONNX model is the torch model, and the deploy model near it.

    Tolerances: the fake-quant model computes the torch arithmetic (1e-6 of the logits' range).  The
    deploy model's int32 biases round each conv's output by up to half a step of its scale
    product, which now and then moves a later quantizer by one step: within 0.5% of the range,
    and less than half as far from torch as the deploy model is from the unsimulated model.
    """
    torch.manual_seed(0)
    model = MobileNetLike().eval()
    x = torch.randn(64, 3, 16, 16)
    qmodel = _calibrated(model, x, tmp_path)
    with caplog.at_level(logging.WARNING, logger="amct_opt"):
        paths = export_models(qmodel, tmp_path / "m", (x[:2],), ["input"], ["logits"], {"input": [0], "logits": [0]})
    assert "the deploy model does not" not in caplog.text
    with torch.no_grad():
        torch_out = qmodel(x).numpy()
    fake_quant_out = _run(paths.fake_quant_path, x, fused=True)
    deploy_out = _run(paths.deploy_path, x, fused=False)
    spread = float(torch_out.max() - torch_out.min())
    assert np.abs(fake_quant_out - torch_out).max() <= 1e-6 * spread
    assert np.abs(deploy_out - torch_out).max() <= 5e-3 * spread
    for layer in qmodel.layers().values():  # the same model without the simulation
        layer.set_requant(None)
        layer.requant_readers = ()
    with torch.no_grad():
        unsimulated = qmodel(x).numpy()

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt((a**2).mean()))

    assert rms(deploy_out - torch_out) < 0.5 * rms(deploy_out - unsimulated)
