"""The reference's manual PTQ path: quantize_model, the user's batches, save_model."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import amct_opt as amct
from amct_opt.calibration import calibrate
from amct_opt.config import QuantConfig
from amct_opt.errors import CalibrationError, ConfigError, InputError
from amct_opt.fusion import FusionPair, fold_conv_bn
from amct_opt.record import read_record

INPUT = torch.zeros(1, 2, 6, 6)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(2, 4, 3, padding=1), bn=nn.BatchNorm2d(4), relu=nn.ReLU(),
        conv2=nn.Conv2d(4, 4, 3, padding=1, groups=4), flatten=nn.Flatten(), fc=nn.Linear(4 * 6 * 6, 3),
    ))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 2, 6, 6) * 2 + 1)
    return model.eval()


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 2, 6, 6, generator=g) for _ in range(n)]


def paths(root: Path) -> dict[str, Path]:
    return {"config": root / "tmp" / "config.json", "modified": root / "tmp" / "modified.onnx",
            "record": root / "tmp" / "record.txt", "save": root / "results" / "net"}


def test_manual_path_writes_the_record_both_models_and_the_fusion_info(tmp_path: Path) -> None:
    model = make_model()
    user_state = {k: v.clone() for k, v in model.state_dict().items()}
    p = paths(tmp_path)
    amct.create_quant_config(p["config"], model, INPUT, skip_layers=["fc"], batch_num=2)
    calib = amct.quantize_model(str(p["config"]), str(p["modified"]), str(p["record"]), model, INPUT)
    assert isinstance(calib.bn, nn.Identity) and isinstance(model.bn, nn.BatchNorm2d)
    onnx.checker.check_model(onnx.load(str(p["modified"])))
    data = batches(2)
    with torch.no_grad():
        torch.testing.assert_close(calib(data[0]), model(data[0]), atol=1e-5, rtol=1e-5)
        calib(data[1])
    amct.save_model(str(p["modified"]), str(p["record"]), str(p["save"]))

    # The record holds exactly what calibrating the folded model on the same batches gives.
    config = QuantConfig.load(p["config"], model_layers=["conv", "conv2", "fc"])
    folded = fold_conv_bn(model, [FusionPair("conv", "bn")])
    expected = calibrate(folded, config, lambda m: [m(x) for x in data])
    assert read_record(p["record"]) == expected
    assert list(expected) == ["conv", "conv2"]

    for suffix in ("_fake_quant_model.onnx", "_deploy_model.onnx"):
        onnx.checker.check_model(onnx.load(f"{p['save']}{suffix}"))
    info = json.loads(Path(f"{p['save']}_quant.json").read_text())
    assert info["fusions"] == [{"layer": "conv", "fused": ["conv", "bn"]}]
    assert (info["quantized_layers"], info["float_layers"]) == (["conv", "conv2"], ["fc"])
    # The user's model is untouched, and the calibration model stays float after save_model.
    assert all(torch.equal(user_state[k], v) for k, v in model.state_dict().items())
    assert isinstance(calib.conv, nn.Conv2d) and not calib.conv._forward_pre_hooks


def test_too_few_batches_fail_save_model_and_more_batches_then_succeed(tmp_path: Path) -> None:
    model = make_model()
    p = paths(tmp_path)
    amct.create_quant_config(p["config"], model, INPUT, batch_num=2)
    calib = amct.quantize_model(p["config"], p["modified"], p["record"], model, INPUT)
    first, second = batches(2)
    with torch.no_grad():
        calib(first)
    with pytest.raises(CalibrationError, match="ran 1 batch.*batch_num is 2"):
        amct.save_model(p["modified"], p["record"], p["save"])
    assert not p["record"].exists()
    with torch.no_grad():
        calib(second)
    amct.save_model(p["modified"], p["record"], p["save"])
    assert set(read_record(p["record"])) == {"conv", "conv2", "fc"}
    with pytest.raises(InputError, match="modified_onnx_file.*not made by quantize_model"):
        amct.save_model(p["modified"], p["record"], p["save"])  # the session is closed


def test_do_fusion_false_and_skip_fusion_layers_keep_the_batchnorm(tmp_path: Path) -> None:
    model = make_model()
    p = paths(tmp_path)
    for defination in ({"do_fusion": False}, {"skip_fusion_layers": ["conv"]}):
        amct.create_quant_config(p["config"], model, INPUT, config_defination=defination)
        calib = amct.quantize_model(p["config"], p["modified"], p["record"], model, INPUT)
        assert isinstance(calib.bn, nn.BatchNorm2d)
        with torch.no_grad():
            calib(batches(1)[0])
        amct.save_model(p["modified"], p["record"], p["save"])
        assert json.loads(Path(f"{p['save']}_quant.json").read_text())["fusions"] == []


def test_quantize_model_validates_the_config_before_writing_anything(tmp_path: Path) -> None:
    model = make_model()
    p = paths(tmp_path)
    amct.create_quant_config(p["config"], model, INPUT)
    data = json.loads(p["config"].read_text())
    data["conv2"]["activation_quant_params"]["search_step"] = -1
    p["config"].write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"conv2\.activation_quant_params\.search_step: must be > 0, got -1"):
        amct.quantize_model(p["config"], p["modified"], p["record"], model, INPUT)
    assert sorted(f.name for f in p["config"].parent.iterdir()) == ["config.json"]
    with pytest.raises(InputError, match="modified_onnx_file"):
        amct.save_model(tmp_path / "never.onnx", p["record"], p["save"])
