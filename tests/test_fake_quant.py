"""fake_quant equals ONNX QuantizeLinear -> DequantizeLinear in ONNX Runtime, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from amct_opt.fake_quant import QMAX, QMIN, fake_quant, fake_quant_per_channel, quantize


def ort_qdq(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Run x through a QuantizeLinear -> DequantizeLinear graph (int8) in ONNX Runtime."""
    attrs = {} if axis is None else {"axis": axis}
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        initializer=[numpy_helper.from_array(scale.astype(np.float32), "s"),
                     numpy_helper.from_array(zero_point.astype(np.int8), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


def test_ties_round_half_to_even_and_out_of_range_values_saturate() -> None:
    scale, zp = torch.tensor(0.5), torch.tensor(3.0)
    # x / scale = 0.5, 1.5, 2.5, -0.5, -1.5, -2.5: ties go to the even neighbour.
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 1000.0, -1000.0])
    assert quantize(x, scale, zp).tolist() == [3.0, 5.0, 5.0, 3.0, 1.0, 1.0, QMAX, QMIN]
    expected = ort_qdq(x.numpy(), scale.numpy(), np.array(3))
    assert np.array_equal(fake_quant(x, scale, zp).numpy(), expected)


@pytest.mark.parametrize("zero_point", [-128, -7, 0, 127])
def test_per_tensor_matches_onnx_runtime_exactly(zero_point: int) -> None:
    g = torch.Generator().manual_seed(zero_point + 128)
    scale = torch.tensor(np.float32(0.0123), dtype=torch.float32)
    grid = (torch.arange(-300, 300, dtype=torch.float32) / 2) * scale  # every half step: all ties
    x = torch.cat([grid, torch.randn(2000, generator=g) * 3])
    got = fake_quant(x, scale, torch.tensor(float(zero_point))).numpy()
    assert np.array_equal(got, ort_qdq(x.numpy(), scale.numpy(), np.array(zero_point)))


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_matches_onnx_runtime_exactly(axis: int) -> None:
    g = torch.Generator().manual_seed(axis)
    w = torch.randn(4, 5, 3, 3, generator=g)
    channels = w.shape[axis]
    scale = (w.movedim(axis, 0).reshape(channels, -1).abs().amax(1) / 127).float()
    scale = torch.tensor(scale.numpy().astype(np.float32))
    got = fake_quant_per_channel(w, scale, torch.zeros(channels), axis).numpy()
    assert np.array_equal(got, ort_qdq(w.numpy(), scale.numpy(), np.zeros(channels), axis=axis))
