"""Names, dynamic axes, atomic writes and external data of the exported files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_cases import exported
from export_helpers import ConvStack, Mlp, quantize, run_ort, session, torch_out
from torch import nn

import amct_opt._io
from amct_opt.export import _save, export_fake_quant_model, export_float_model, export_models


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + self.b(y), self.a(x)


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize(
    ("axes", "batch_dim"),
    [
        ({"x": {0: "batch"}, "y": {0: "batch"}, "sum": {0: "batch"}, "a": {0: "batch"}}, "batch"),
        ({"x": [0], "y": [0], "sum": [0], "a": [0]}, None),
    ],
)
def test_names_and_both_dynamic_axes_forms(axes: dict, batch_dim: str | None, tmp_path: Path) -> None:
    x, y = torch.randn(2, 6), torch.randn(2, 3)
    qmodel = quantize(TwoInputs(), (x, y))
    paths = export_models(qmodel, tmp_path / "two", (x, y), ["x", "y"], ["sum", "a"], axes)
    x5, y5 = torch.randn(5, 6), torch.randn(5, 3)
    for path in (paths.fake_quant_path, paths.deploy_path):
        graph = onnx.load(path).graph
        assert [v.name for v in graph.input] == ["x", "y"]
        assert [v.name for v in graph.output] == ["sum", "a"]
        for value, rest in zip([*graph.input, *graph.output], (6, 3, 4, 4)):
            batch, *tail = _dims(value)
            assert isinstance(batch, str) and (batch_dim is None or batch == batch_dim)
            assert tail == [rest]
        # The deploy model's arithmetic, node by node: see run_ort on integer-kernel saturation.
        outputs = session(path, fused=path != paths.deploy_path).run(None, {"x": x5.numpy(), "y": y5.numpy()})
        with torch.no_grad():
            expected = qmodel(x5, y5)
        for got, want in zip(outputs, expected):
            assert got.shape == (5, 4)
            assert np.abs(got - want.numpy()).max() <= 2 * float(want.max() - want.min()) / 255


@pytest.mark.parametrize(
    ("axes", "named"),
    [
        ({"images": [0, 2, 3]}, False),  # the seed's list form: torch.onnx names the axes
        ({"images": {0: "batch", 2: "height", 3: "width"}}, True),
    ],
)
def test_several_dynamic_axes_of_one_input(axes: dict, named: bool, tmp_path: Path) -> None:
    """Batch, height and width all dynamic: both models run at shapes other than the exported one."""
    x = torch.randn(2, 3, 16, 16)
    qmodel = quantize(ConvStack(), (x,))
    paths = export_models(qmodel, tmp_path / "conv", (x,), ["images"], ["logits"], axes)
    other = torch.randn(3, 3, 24, 20)
    with torch.no_grad():
        expected = qmodel(other).numpy()
    for path in (paths.fake_quant_path, paths.deploy_path):
        dims = _dims(onnx.load(path).graph.input[0])
        assert [isinstance(d, str) for d in dims] == [True, False, True, True]
        assert dims[1] == 3
        if named:
            assert [dims[0], dims[2], dims[3]] == ["batch", "height", "width"]
        (got,) = session(path, fused=path != paths.deploy_path).run(None, {"images": other.numpy()})
        assert got.shape == (3, 10)
        assert np.abs(got - expected).max() <= 2 * float(expected.max() - expected.min()) / 255


def test_without_dynamic_axes_the_batch_is_fixed(tmp_path: Path) -> None:
    x = torch.randn(3, 20)
    export_fake_quant_model(quantize(Mlp(), (x,)), tmp_path / "m.onnx", (x,), ["input"], ["logits"])
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert (_dims(graph.input[0]), _dims(graph.output[0])) == ([3, 20], [3, 5])


def test_float_model_export(tmp_path: Path) -> None:
    model, x = Mlp().eval(), torch.randn(4, 20)
    export_float_model(
        model, tmp_path / "float.onnx", (x,), ["input"], ["logits"], {"input": [0], "logits": [0]}
    )
    graph = onnx.load(tmp_path / "float.onnx").graph
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in graph.node}
    np.testing.assert_allclose(run_ort(tmp_path / "float.onnx", x[:2]), torch_out(model, x[:2]), atol=1e-5)


def test_a_crash_while_writing_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(2, 20)
    qmodel = quantize(Mlp(), (x,))
    deploy = tmp_path / "m_deploy_model.onnx"
    deploy.write_bytes(b"previous model")
    calls = []
    real_fsync = amct_opt._io.os.fsync

    def fail_on_second_file(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(amct_opt._io.os, "fsync", fail_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        export_models(qmodel, tmp_path / "m", (x,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_deploy_model.onnx", "m_fake_quant_model.onnx"]
    assert deploy.read_bytes() == b"previous model"
    onnx.checker.check_model(str(tmp_path / "m_fake_quant_model.onnx"))


def test_a_crash_while_writing_external_data_leaves_no_onnx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = onnx.load(_small_model(tmp_path))

    def crash(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(_save, "write_external_data_tensors", crash)
    with pytest.raises(OSError, match="disk full"):
        _save.save_model(model, tmp_path / "out" / "big.onnx", external_data_threshold=1)
    assert list((tmp_path / "out").iterdir()) == []


def _small_model(tmp_path: Path) -> Path:
    x = torch.randn(2, 20)
    export_fake_quant_model(quantize(Mlp(), (x,)), tmp_path / "small.onnx", (x,), ["input"], ["logits"])
    return tmp_path / "small.onnx"


def test_external_data_above_the_threshold(tmp_path: Path) -> None:
    source = _small_model(tmp_path)
    model = onnx.load(source)
    size = _save.tensor_bytes(model)
    _save.save_model(onnx.load(source), tmp_path / "inline.onnx", external_data_threshold=size + 1)
    _save.save_model(onnx.load(source), tmp_path / "external.onnx", external_data_threshold=size)
    assert not (tmp_path / "inline.onnx.data").exists()
    data = tmp_path / "external.onnx.data"
    assert data.stat().st_size > (tmp_path / "external.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "external.onnx"))
    x = torch.randn(2, 20)
    np.testing.assert_array_equal(run_ort(tmp_path / "external.onnx", x), run_ort(source, x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_default_threshold_is_protobufs_2gb_limit() -> None:
    assert _save.EXTERNAL_DATA_THRESHOLD == 2**31 - 1


def test_exports_use_external_data_past_the_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = exported("conv_stack")
    x = case.calibration[:2]
    monkeypatch.setattr(_save, "EXTERNAL_DATA_THRESHOLD", 1024)
    paths = export_models(case.qmodel, tmp_path / "big", (x,))
    assert {p.name for p in tmp_path.iterdir()} == {
        "big_fake_quant_model.onnx",
        "big_fake_quant_model.onnx.data",
        "big_deploy_model.onnx",
        "big_deploy_model.onnx.data",
    }
    np.testing.assert_array_equal(run_ort(paths.fake_quant_path, x), run_ort(case.paths.fake_quant_path, x))
    expected = torch_out(case.qmodel, x)
    assert (
        np.abs(run_ort(paths.deploy_path, x, fused=False) - expected).max()
        <= 2 * (expected.max() - expected.min()) / 255
    )
