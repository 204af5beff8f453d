"""The deploy ONNX model: int8 weights, int32 biases, shared quantizers, and integer kernels in ORT."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_cases import CASES, export_case, exported
from export_helpers import (
    ConvStack,
    initializers,
    layer_node,
    producers,
    quantize,
    run_ort,
    torch_out,
    weight_source,
)

import amct_opt as amct
from amct_opt.calibration import calibrate_layers
from amct_opt.config import QuantConfig
from amct_opt.export import export_models
from amct_opt.export.ort_check import INTEGER_OPS, op_counts, optimized_model
from amct_opt.quant_model import build_quantized_model
from amct_opt.types import LayerQuantFactors

FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
#: Float matrix products that are not layers (attention) and layers ORT has no integer kernel
#: for (ConvTranspose), per case.
UNQUANTIZABLE_FLOAT_OPS = {"encoder": 2, "encoder_static": 2, "conv_transpose": 1}
#: Quantized convs whose output feeds a float layer directly keep a float output (that layer sees
#: the float values of the fake-quant model), hence a float kernel on the dequantized int8 weight:
#: ORT's ConvInteger, the integer kernel with a float output, ran MobileNetV2's convs 5x slower.
CONVS_BEFORE_FLOAT_LAYERS = {"mixed_float": 1}
#: Quantized layers ORT runs with a float kernel: those convs, and every ConvTranspose (no ORT
#: integer kernel).
UNFUSED_LAYERS = {"mixed_float": {"block1.conv.0.0"}, "conv_transpose": {"up"}}
LEVELS = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def _dq_of(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    node = producers(model)[name]
    assert node.op_type == "DequantizeLinear", node.op_type
    return node


def _axis(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_weights_are_int8_initializers_followed_by_dequantize(name: str) -> None:
    case = exported(name)
    model = onnx.load(case.paths.deploy_path)
    onnx.checker.check_model(model, full_check=True)
    values = initializers(model)
    made_by = producers(model)
    for layer, on in case.qmodel.plan.items():
        node = layer_node(model, layer)
        if not on:
            assert values[node.input[1]].dtype == np.float32
            continue
        if layer in UNFUSED_LAYERS.get(name, ()):
            # A float kernel on exactly the dequantized int8 weight, the input read through the
            # Div/Round/Clip/Mul form of its quantizer (not a DequantizeLinear ORT would requantize).
            np.testing.assert_array_equal(values[node.input[1]], case.qmodel.layer(layer).fq_weight.numpy())
            assert made_by[node.input[0]].op_type == "Mul"
            continue
        factors = case.qmodel.layer(layer).factors
        dq = _dq_of(model, node.input[1])
        assert values[dq.input[0]].dtype == np.int8
        scale = values[dq.input[1]]
        if len(factors.scale_w) > 1:
            expected_axis = 1 if node.op_type in ("ConvTranspose", "MatMul") else 0
            assert (scale.shape, _axis(dq)) == ((len(factors.scale_w),), expected_axis)
        else:
            assert scale.shape == ()


@pytest.mark.parametrize("name", sorted(CASES))
def test_biases_are_int32_where_ort_fuses_them(name: str) -> None:
    """Conv/Gemm bias, or the Add after a 3-D Linear's MatMul if shapes are static: int32 with scale
    scale_d * scale_w.  With a dynamic batch ORT runs MatMulIntegerToFloat + Add: the bias stays float."""
    case = exported(name)
    model = onnx.load(case.paths.deploy_path)
    values, made_by = initializers(model), producers(model)
    for layer, on in case.qmodel.plan.items():
        node = layer_node(model, layer)
        if not on or case.qmodel.layer(layer).module.bias is None:
            continue
        if layer in UNFUSED_LAYERS.get(name, ()):  # ConvTranspose, or a conv before a float layer
            assert values[node.input[2]].dtype == np.float32
            continue
        if node.op_type == "MatMul":
            add = next(n for n in model.graph.node if node.output[0] in n.input)
            bias_name = next(i for i in add.input if i != node.output[0])
            if CASES[name].dynamic_batch:
                assert values[bias_name].dtype == np.float32
                continue
        else:
            bias_name = node.input[2]
        dq = _dq_of(model, bias_name)
        assert values[dq.input[0]].dtype == np.int32
        x_scale = values[made_by[node.input[0]].input[1]]
        w_scale = values[made_by[node.input[1]].input[1]]
        np.testing.assert_array_equal(values[dq.input[1]], (x_scale * w_scale).astype(np.float32))
        assert not values[dq.input[2]].any()


def _runs_on(optimized: onnx.ModelProto, weight: str) -> list[str]:
    """Op types of the nodes in ORT's optimized graph that read the initializer ``weight``."""
    return [node.op_type for node in optimized.graph.node if weight in node.input]


@pytest.mark.parametrize("level", LEVELS, ids=["extended", "all"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ort_runs_every_quantized_conv_and_linear_as_an_integer_op(name: str, level: object) -> None:
    """In the graph ORT writes (``SessionOptions.optimized_model_filepath``), each quantized Conv,
    Gemm and MatMul layer's int8 weight is read by an integer kernel, and each float layer's float
    weight by a float one.  The exceptions: ConvTranspose, for which ORT has no integer kernel, and a
    quantized conv whose output a float layer reads (see CONVS_BEFORE_FLOAT_LAYERS)."""
    case = exported(name)
    model = onnx.load(case.paths.deploy_path)
    optimized = optimized_model(case.paths.deploy_path, level)
    values = initializers(model)
    for layer, on in case.qmodel.plan.items():
        weight = weight_source(model, layer_node(model, layer))
        ops = _runs_on(optimized, weight)
        if on and layer not in UNFUSED_LAYERS.get(name, ()):
            assert values[weight].dtype == np.int8, layer
            assert len(ops) == 1 and ops[0] in INTEGER_OPS, (layer, ops)
        else:  # (at ORT_ENABLE_ALL, ORT re-lays a float conv's weight out under another name)
            assert not set(ops) & INTEGER_OPS, (layer, ops)
    counts = op_counts(optimized)
    quantized = sum(case.qmodel.plan.values()) - len(UNFUSED_LAYERS.get(name, ()))
    float_layers = len(case.qmodel.plan) - sum(case.qmodel.plan.values())
    assert sum(counts[op] for op in INTEGER_OPS) == quantized, counts
    assert sum(counts[op] for op in FLOAT_COMPUTE_OPS) == (
        float_layers + UNQUANTIZABLE_FLOAT_OPS.get(name, 0) + CONVS_BEFORE_FLOAT_LAYERS.get(name, 0)
    )


def test_all_optimization_levels_fuse_the_mobilenet_like_model() -> None:
    path = exported("mobilenet_like").paths.deploy_path
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        counts = op_counts(optimized_model(path, level))
        assert counts["QLinearConv"] == 8 and counts["QGemm"] == 1, counts
        assert not FLOAT_COMPUTE_OPS & set(counts)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_tensor_is_quantized_once(name: str) -> None:
    case = exported(name)
    model = onnx.load(case.paths.deploy_path)
    sources = Counter(n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert max(sources.values()) == 1
    dequantized = Counter(n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert max(dequantized.values()) == 1


@pytest.mark.parametrize(("name", "readers"), [("branches", ("left", "right")), ("encoder", ("q", "k", "v"))])
def test_neighbouring_layers_share_their_input_quantizer(name: str, readers: tuple[str, ...]) -> None:
    case = exported(name)
    fake_quant, deploy = onnx.load(case.paths.fake_quant_path), onnx.load(case.paths.deploy_path)
    for model, quantizers in ((fake_quant, len(readers)), (deploy, 1)):
        made_by = producers(model)
        dqs = {made_by[layer_node(model, layer).input[0]].name for layer in readers}
        qs = {made_by[made_by[layer_node(model, layer).input[0]].input[0]].name for layer in readers}
        assert (len(qs), len(dqs)) == (quantizers, quantizers)


def test_float_layers_stay_float_with_no_qdq_of_their_own() -> None:
    case = exported("mixed_float")
    model = onnx.load(case.paths.deploy_path)
    values, made_by = initializers(model), producers(model)
    for layer in CASES["mixed_float"].float_layers:
        node = layer_node(model, layer)
        assert all(values[name].dtype == np.float32 for name in node.input[1:])
        source = made_by.get(node.input[0])
        assert source is None or source.op_type != "DequantizeLinear"
        assert not [
            n for n in model.graph.node if node.output[0] in n.input and n.op_type == "QuantizeLinear"
        ]


@pytest.mark.parametrize("name", [*sorted(UNFUSED_LAYERS), "mobilenet_like"])
def test_the_export_names_the_quantized_layers_that_run_float_kernels(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A user whose deploy model is slower than expected learns which layers and why; an all-INT8
    conv net, where every layer runs an integer kernel, logs no such line."""
    with caplog.at_level("INFO", logger="amct_opt.export"):
        export_case(name, tmp_path / name)
    lines = [r.getMessage() for r in caplog.records if "float kernels" in r.getMessage()]
    if name not in UNFUSED_LAYERS:
        assert not lines
        return
    [line] = lines
    assert line.endswith(": " + ", ".join(sorted(UNFUSED_LAYERS[name])))
    assert f"{len(UNFUSED_LAYERS[name])} quantized layer(s)" in line


def test_symmetric_activations_after_relu6_still_fuse() -> None:
    """Offset-0 quantizers after ReLU6 keep negative codes, so ORT could not drop the Clip in front
    of them: the deploy model cuts their range to [0, 6] (asymmetric) instead."""
    counts = op_counts(optimized_model(exported("symmetric").paths.deploy_path))
    assert counts["QLinearConv"] == 4 and not {"Conv", "FusedConv", "Clip"} & set(counts)


def test_quantizer_a_hair_over_relu6_is_fitted(tmp_path: Path) -> None:
    """scale * 255 a few float32 ulps above 6 would make ORT keep the Clip (and a float Conv)."""
    x = torch.randn(8, 3, 16, 16)
    qmodel = quantize(ConvStack(), (x,))
    layer = qmodel.layer("features.1.0")
    scale = float(np.nextafter(np.nextafter(np.float32(6 / 255), np.float32(1)), np.float32(1)))
    assert np.float32(scale) * np.float32(255) - np.float32(6) > np.finfo(np.float32).eps
    factors = layer.factors
    qmodel.layer("features.1.0").scale_d.fill_(scale)
    layer.factors = LayerQuantFactors(scale, -128, factors.scale_w, factors.offset_w)
    layer.offset_d.fill_(-128)
    paths = export_models(qmodel, tmp_path / "m", (x,))
    counts = op_counts(optimized_model(paths.deploy_path))
    assert counts["QLinearConv"] == 4 and not {"Conv", "FusedConv", "Clip"} & set(counts)
    expected = torch_out(qmodel, x)
    step = (expected.max() - expected.min()) / 255
    assert np.abs(run_ort(paths.deploy_path, x, fused=False) - expected).max() <= 2 * step


def test_seven_bit_weights_run_on_integer_kernels_exactly(tmp_path: Path) -> None:
    """``weight_quant_params.num_bits`` 7: int8 weights in [-63, 63], which ORT's u8s8 kernels
    cannot saturate on any x86 CPU, so the fused model computes what its Q/DQ graph says."""
    torch.manual_seed(0)
    model = ConvStack().eval()
    with torch.no_grad():  # large same-sign weights times large inputs: what saturates 8-bit weights
        model.features[0][0].weight.uniform_(0.5, 1.0)
    x = 4 * torch.rand(16, 3, 16, 16).sqrt()
    config_file = tmp_path / "q.json"
    amct.create_quant_config(str(config_file), model, x[:1], config_defination={"weight_quant_params": {"num_bits": 7}})
    calibration = calibrate_layers(model, QuantConfig.load(config_file), lambda m: m(x))
    qmodel = build_quantized_model(copy.deepcopy(model), calibration.record, calibration.output_ranges).eval()
    paths = export_models(qmodel, tmp_path / "m", (x[:2],), ["input"], ["logits"], {"input": {0: "b"}, "logits": {0: "b"}})
    values = initializers(onnx.load(paths.deploy_path))
    weights = [values[n] for n in values if values[n].dtype == np.int8 and values[n].ndim >= 2]
    assert len(weights) == 5 and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) == 63
    counts = op_counts(optimized_model(paths.deploy_path))
    assert counts["QLinearConv"] == 4 and counts["QGemm"] == 1
    fused, unfused = run_ort(paths.deploy_path, x), run_ort(paths.deploy_path, x, fused=False)
    step = (unfused.max() - unfused.min()) / 255
    assert np.abs(fused - unfused).max() <= step
