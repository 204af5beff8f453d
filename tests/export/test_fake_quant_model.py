"""The fake-quant ONNX model: float weights, standard Q/DQ, and ORT reproduces the torch model."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_cases import CASES, exported
from export_helpers import ConvStack, initializers, layer_node, producers, quantize, run_ort, torch_out

from amct_opt.export import export_fake_quant_model
from amct_opt.export.ort_check import INTEGER_OPS, op_counts, optimized_model


@pytest.mark.parametrize("name", sorted(CASES))
def test_ort_matches_torch_within_one_output_step(name: str) -> None:
    """Tolerance: one 8-bit step of the output's range, (max - min) / 255, on unseen inputs."""
    case = exported(name)
    expected = torch_out(case.qmodel, case.test)
    actual = run_ort(case.paths.fake_quant_path, case.test)
    step = (expected.max() - expected.min()) / 255
    assert np.abs(actual - expected).max() <= step


def _simulated_quantizer(made_by: dict[str, onnx.NodeProto], name: str) -> onnx.NodeProto | None:
    """The Div of ``name = Mul(Clip(Round(Div(x, scale)), qmin, qmax), scale)`` (Min(Max()) for a
    per-channel clip), or None when ``name`` is not made so."""
    node = made_by.get(name)
    if node is None or node.op_type != "Mul":
        return None
    node = made_by.get(node.input[0])
    if node is not None and node.op_type == "Min":
        node = made_by.get(node.input[0])
        if node is None or node.op_type != "Max":
            return None
    elif node is None or node.op_type != "Clip":
        return None
    for op in ("Round", "Div"):
        node = made_by.get(node.input[0])
        if node is None or node.op_type != op:
            return None
    return node


@pytest.mark.parametrize("name", sorted(CASES))
def test_float_weights_standard_ops_and_fake_quant_exactly_at_enabled_layers(name: str) -> None:
    """Weights and activations: Div/Round/Clip/Mul on the float tensor, so that ORT fuses nothing
    into an integer kernel (neither QLinearConv nor MatMulNBits) and computes the torch values."""
    case = exported(name)
    model = onnx.load(case.paths.fake_quant_path)
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {""}
    assert {o.domain for o in model.opset_import} == {""}
    values = initializers(model)
    assert all(a.dtype == np.float32 for a in values.values() if a.ndim >= 2)
    made_by = producers(model)
    for layer, on in case.qmodel.plan.items():
        node = layer_node(model, layer)
        weight = node.input[1]
        if made_by.get(weight) is not None and made_by[weight].op_type == "Transpose":
            weight = made_by[weight].input[0]
        if on:
            div = _simulated_quantizer(made_by, weight)
            assert div is not None, layer
            np.testing.assert_array_equal(values[div.input[0]], case.qmodel.layer(layer).module.weight.detach().numpy())
            assert _simulated_quantizer(made_by, node.input[0]), layer
        else:
            assert weight in values, f"float layer {layer} has a quantized weight"
            assert not _simulated_quantizer(made_by, node.input[0]), layer
    ops = [n.op_type for n in model.graph.node]
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(ops)
    # Input and weight of each enabled layer, plus the output requantizers the deploy model adds
    # where a quantized layer's and another op read a conv's output (see amct_opt.requant).
    requantized = [n for n, layer in case.qmodel.layers().items() if layer.quant_enabled and layer.output_requant()]
    assert ops.count("Round") == 2 * sum(case.qmodel.plan.values()) + len(requantized)
    counts = op_counts(optimized_model(case.paths.fake_quant_path))
    assert not {*INTEGER_OPS, "MatMulNBits", "DynamicQuantizeMatMul"} & set(counts), counts


def test_per_channel_weight_quantizers_use_the_output_channel_axis() -> None:
    """Per-channel scales broadcast along each weight's output-channel axis (1 for ConvTranspose)."""
    case = exported("conv_transpose")
    model = onnx.load(case.paths.fake_quant_path)
    values, made_by = initializers(model), producers(model)
    for layer, axis in (("conv", 0), ("up", 1), ("out", 0)):
        div = _simulated_quantizer(made_by, layer_node(model, layer).input[1])
        assert div is not None
        scale = values[div.input[1]]
        expected = [1] * 4
        expected[axis] = len(case.qmodel.layer(layer).factors.scale_w)
        assert list(scale.shape) == expected, layer


def test_export_leaves_the_quantized_model_unchanged(tmp_path: Path) -> None:
    x = torch.randn(4, 3, 16, 16)
    qmodel = quantize(ConvStack(), (x,), float_layers=("features.1.0",))
    qmodel.train()
    before_state = copy.deepcopy(qmodel.state_dict())
    before_plan = qmodel.plan
    with torch.no_grad():
        before_out = qmodel.eval()(x)
    qmodel.train()
    export_fake_quant_model(qmodel, tmp_path / "m.onnx", (x,))
    assert qmodel.training and all(m.training for m in qmodel.modules())
    assert qmodel.plan == before_plan
    assert all("forward" not in layer.__dict__ for layer in qmodel.layers().values())
    assert all(torch.equal(v, before_state[k]) for k, v in qmodel.state_dict().items())
    with torch.no_grad():
        assert torch.equal(qmodel.eval()(x), before_out)


def test_all_float_plan_exports_without_any_qdq(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 16, 16)
    qmodel = quantize(ConvStack(), (x,))
    qmodel.set_all(False)
    export_fake_quant_model(qmodel, tmp_path / "m.onnx", (x,))
    model = onnx.load(tmp_path / "m.onnx")
    assert not [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Round")]
    np.testing.assert_allclose(run_ort(tmp_path / "m.onnx", x), torch_out(qmodel, x), atol=1e-5)
