"""Tests of the quant config layer: amct_opt.config and amct_opt.create_config."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from amct_opt import _io
from amct_opt.config import ActivationQuantParams, QuantConfig
from amct_opt.create_config import create_quant_config
from amct_opt.errors import ConfigError, InputError, UnsupportedModelError

LAYERS = ["features.0", "fc"]


def make_model() -> nn.Module:
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    return nn.Sequential(OrderedDict(features=features, flatten=nn.Flatten(), fc=nn.Linear(4 * 6 * 6, 10)))


INPUT = torch.zeros(1, 3, 8, 8)


@pytest.fixture()
def valid() -> dict[str, Any]:
    return {
        "version": 1, "batch_num": 2, "activation_offset": True, "do_fusion": True, "skip_fusion_layers": [],
        "features.0": {
            "quant_enable": True,
            "activation_quant_params": {"num_bits": 8, "act_algo": "ifmr", "max_percentile": 0.999999,
                                        "min_percentile": 0.999999, "search_range": [0.7, 1.3],
                                        "search_step": 0.01, "asymmetric": True},
            "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": True},
        },
        "fc": {
            "quant_enable": True,
            "activation_quant_params": {"num_bits": 8, "act_algo": "hfmg", "num_of_bins": 4096, "asymmetric": True},
            "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": False},
        },
    }


def test_create_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    config = create_quant_config(path, make_model(), INPUT, batch_num=3)
    assert list(config.layers) == LAYERS
    assert QuantConfig.load(path, model_layers=LAYERS) == config
    assert QuantConfig.from_dict(config.to_dict(), model_layers=LAYERS) == config
    assert json.loads(path.read_text())["batch_num"] == 3


class EveryType(nn.Module):
    """One of each quantizable type (grouped and depthwise convs too) among layers that are not."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, groups=4), nn.MaxPool2d(2))
        self.c3 = nn.Conv3d(1, 2, 1)
        self.t1 = nn.ConvTranspose1d(4, 4, 2)
        self.t2 = nn.ConvTranspose2d(4, 4, 2)
        self.fc = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)


EVERY_TYPE = ["c1", "block.0", "block.3", "c3", "t1", "t2", "fc"]


def test_every_quantizable_type_gets_an_entry_in_the_reference_form(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    create_quant_config(path, EveryType(), INPUT, skip_layers=["t1"], batch_num=2, activation_offset=False)
    data = json.loads(path.read_text())
    assert list(data) == ["version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers",
                          *EVERY_TYPE]
    assert [data[k] for k in ("version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers")] \
        == [1, 2, False, True, []]
    for name in EVERY_TYPE:
        assert data[name] == {
            "quant_enable": name != "t1",
            "activation_quant_params": {"num_bits": 8, "act_algo": "ifmr", "max_percentile": 0.999999,
                                        "min_percentile": 0.999999, "search_range": [0.7, 1.3],
                                        "search_step": 0.01, "asymmetric": False},
            "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": name != "fc"},
        }, name


def test_to_dict_writes_only_the_keys_of_the_algorithm(valid: dict[str, Any]) -> None:
    data = QuantConfig.from_dict(valid).to_dict()
    assert data == valid
    assert set(data["fc"]["activation_quant_params"]) == {"num_bits", "act_algo", "num_of_bins", "asymmetric"}


def test_skip_layers_and_channel_wise_defaults(tmp_path: Path) -> None:
    config = create_quant_config(tmp_path / "q.json", make_model(), (INPUT,), skip_layers=["fc"])
    assert config.enabled_layers() == ["features.0"]
    assert config.layers["features.0"].weight.channel_wise is True
    assert config.layers["fc"].weight.channel_wise is False


def test_model_without_quantizable_layer(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="model"):
        create_quant_config(tmp_path / "q.json", nn.Sequential(nn.ReLU(), nn.Flatten()), INPUT)
    assert list(tmp_path.iterdir()) == []


def test_config_defination_overrides(tmp_path: Path) -> None:
    defination = tmp_path / "def.json"
    defination.write_text(json.dumps({
        "batch_num": 4, "activation_offset": False, "skip_fusion_layers": ["features.0"],
        "activation_quant_params": {"search_step": 0.02},
        "weight_quant_params": {"channel_wise": True},
        "layers": {"fc": {"activation_quant_params": {"act_algo": "hfmg", "num_of_bins": 2048}}},
    }))
    path = tmp_path / "q.json"
    config = create_quant_config(path, make_model(), INPUT, batch_num=2, config_defination=defination)
    assert (config.batch_num, config.activation_offset, config.skip_fusion_layers) == (4, False, ("features.0",))
    conv, fc = config.layers["features.0"], config.layers["fc"]
    assert conv.activation == ActivationQuantParams(search_step=0.02, asymmetric=False)
    assert fc.activation == ActivationQuantParams(act_algo="hfmg", num_of_bins=2048, asymmetric=False)
    assert fc.weight.channel_wise is True
    assert QuantConfig.load(path, model_layers=LAYERS) == config


def test_seven_bit_weights_round_trip_and_other_widths_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    config = create_quant_config(path, make_model(), INPUT, config_defination={"weight_quant_params": {"num_bits": 7}})
    assert {layer.weight.num_bits for layer in config.layers.values()} == {7}
    assert json.loads(path.read_text())["fc"]["weight_quant_params"]["num_bits"] == 7
    assert QuantConfig.load(path, model_layers=LAYERS) == config
    with pytest.raises(ConfigError, match=r"^.*weight_quant_params\.num_bits: must be 8, or 7"):
        create_quant_config(tmp_path / "r.json", make_model(), INPUT,
                            config_defination={"weight_quant_params": {"num_bits": 6}})
    assert not (tmp_path / "r.json").exists()


def test_config_defination_skip_layers_and_layer_disable(tmp_path: Path) -> None:
    config = create_quant_config(
        tmp_path / "q.json", make_model(), INPUT, skip_layers=["features.0"],
        config_defination={"skip_layers": [], "layers": {"fc": {"quant_enable": False}}})
    assert config.enabled_layers() == ["features.0"]


def test_from_dict_orders_by_model_and_disables_missing_layers(valid: dict[str, Any]) -> None:
    del valid["features.0"]
    valid["activation_offset"] = False
    config = QuantConfig.from_dict(valid, model_layers=LAYERS)
    assert list(config.layers) == LAYERS
    assert config.layers["features.0"].quant_enable is False
    assert config.layers["features.0"].activation.asymmetric is False


def test_absent_asymmetric_follows_activation_offset(valid: dict[str, Any]) -> None:
    valid["activation_offset"] = False
    del valid["fc"]["activation_quant_params"]["asymmetric"]
    assert QuantConfig.from_dict(valid).layers["fc"].activation.asymmetric is False


def test_with_plan_and_fingerprint(valid: dict[str, Any]) -> None:
    config = QuantConfig.from_dict(valid)
    planned = config.with_plan({"fc": False})
    assert planned.enabled_layers() == ["features.0"]
    assert config.enabled_layers() == LAYERS
    assert planned.fingerprint() != config.fingerprint()
    assert QuantConfig.from_dict(config.to_dict()).fingerprint() == config.fingerprint()
    with pytest.raises(InputError, match="plan"):
        config.with_plan({"nope": True})


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets ``path`` (``/``-separated) to ``value``; ``...`` deletes it."""
    *parents, leaf = path.split("/")

    def mutate(data: dict[str, Any]) -> None:
        for key in parents:
            data = data[key]
        if value is ...:
            del data[leaf]
        else:
            data[leaf] = value
    return mutate


ACT = "features.0/activation_quant_params"
HFMG = "fc/activation_quant_params"
WTS = "features.0/weight_quant_params"

FROM_DICT_ERRORS = [
    ("version", 2, "version"),
    ("batch_num", 0, "batch_num"),
    ("batch_num", True, "batch_num"),
    ("activation_offset", "yes", "activation_offset"),
    ("do_fusion", 1, "do_fusion"),
    ("skip_fusion_layers", "fc", "skip_fusion_layers"),
    ("skip_fusion_layers", ["nope"], "skip_fusion_layers[0]"),
    ("classifier", {"quant_enable": True}, "classifier: not a quantizable layer"),
    ("fc", [1], "fc: must be a JSON object"),
    ("fc/quant_enable", ..., "fc.quant_enable: is required"),
    ("fc/quant_enable", "true", "fc.quant_enable"),
    ("fc/bogus", 1, "fc.bogus: unknown key"),
    ("fc/activation_quant_params", [], "fc.activation_quant_params: must be a JSON object"),
    (f"{ACT}/num_bits", 4, "features.0.activation_quant_params.num_bits: must be 8"),
    (f"{ACT}/act_algo", "kl", "features.0.activation_quant_params.act_algo"),
    (f"{ACT}/max_percentile", 0.5, "features.0.activation_quant_params.max_percentile"),
    (f"{ACT}/min_percentile", 1.5, "features.0.activation_quant_params.min_percentile"),
    (f"{ACT}/min_percentile", "0.9", "features.0.activation_quant_params.min_percentile"),
    (f"{ACT}/search_range", [1.3, 0.7], "features.0.activation_quant_params.search_range"),
    (f"{ACT}/search_range", [0.7], "features.0.activation_quant_params.search_range"),
    (f"{ACT}/search_range", [0, 1], "features.0.activation_quant_params.search_range"),
    (f"{ACT}/search_step", -1, "features.0.activation_quant_params.search_step: must be > 0, got -1"),
    (f"{ACT}/search_step", 0.7, "features.0.activation_quant_params.search_step: must be <="),
    (f"{ACT}/num_of_bins", 2048, "features.0.activation_quant_params.num_of_bins"),
    (f"{ACT}/clip", 1.0, "features.0.activation_quant_params.clip: unknown key; allowed keys"),
    (f"{ACT}/asymmetric", "no", "features.0.activation_quant_params.asymmetric"),
    (f"{HFMG}/num_of_bins", 1000, "fc.activation_quant_params.num_of_bins"),
    (f"{HFMG}/search_step", 0.01, "fc.activation_quant_params.search_step: is an IFMR key"),
    (f"{WTS}/wts_algo", "minmax", "features.0.weight_quant_params.wts_algo"),
    (f"{WTS}/num_bits", 16, "features.0.weight_quant_params.num_bits"),
    (f"{WTS}/channel_wise", "yes", "features.0.weight_quant_params.channel_wise"),
    (f"{WTS}/per_tensor", True, "features.0.weight_quant_params.per_tensor: unknown key"),
]


@pytest.mark.parametrize(("path", "value", "expected"), FROM_DICT_ERRORS,
                         ids=[f"{p}={v!r}" for p, v, _ in FROM_DICT_ERRORS])
def test_from_dict_validation_errors(valid: dict[str, Any], path: str, value: Any, expected: str) -> None:
    _set(path, value)(valid)
    with pytest.raises(ConfigError) as info:
        QuantConfig.from_dict(valid, model_layers=LAYERS)
    assert expected in str(info.value)


def test_mixing_error_names_both_keys(valid: dict[str, Any]) -> None:
    valid["fc"]["activation_quant_params"]["search_step"] = 0.01
    with pytest.raises(ConfigError, match=r"search_step.*'hfmg'"):
        QuantConfig.from_dict(valid)


def test_unknown_layer_error_lists_valid_names(valid: dict[str, Any]) -> None:
    valid["classifier"] = {"quant_enable": True}
    with pytest.raises(ConfigError, match=r"'features\.0', 'fc'"):
        QuantConfig.from_dict(valid, model_layers=LAYERS)


CREATE_ERRORS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"skip_layers": ["nope"]}, ConfigError, "skip_layers[0]: unknown layer 'nope'; valid layers: 'features.0'"),
    ({"skip_layers": "fc"}, ConfigError, "skip_layers"),
    ({"batch_num": 0}, ConfigError, "batch_num"),
    ({"batch_num": 2.0}, ConfigError, "batch_num"),
    ({"activation_offset": 1}, ConfigError, "activation_offset"),
    ({"input_data": [INPUT]}, InputError, "input_data"),
    ({"input_data": ()}, InputError, "input_data"),
    ({"model": "resnet"}, InputError, "model"),
    ({"config_file": 3}, InputError, "config_file"),
    ({"config_defination": {"bogus": 1}}, ConfigError, "config_defination.bogus: unknown key"),
    ({"config_defination": {"batch_num": "4"}}, ConfigError, "config_defination.batch_num"),
    ({"config_defination": {"skip_layers": ["x"]}}, ConfigError, "config_defination.skip_layers[0]"),
    ({"config_defination": {"activation_quant_params": {"search_step": -1}}}, ConfigError,
     "config_defination.activation_quant_params.search_step: must be > 0"),
    ({"config_defination": {"weight_quant_params": {"wts_algo": "x"}}}, ConfigError,
     "config_defination.weight_quant_params.wts_algo"),
    ({"config_defination": {"layers": {"nope": {}}}}, ConfigError, "config_defination.layers.nope"),
    ({"config_defination": {"layers": {"fc": {"quant_enable": 1}}}}, ConfigError,
     "config_defination.layers.fc.quant_enable"),
    ({"config_defination": {"layers": {"fc": {"activation_quant_params": {"num_of_bins": 2048}}}}}, ConfigError,
     "config_defination.layers.fc.activation_quant_params.num_of_bins: is an HFMG key"),
    ({"config_defination": {"activation_quant_params": {"act_algo": "hfmg"},
                            "layers": {"fc": {"activation_quant_params": {"search_step": 0.1}}}}}, ConfigError,
     "config_defination.layers.fc.activation_quant_params.search_step"),
    ({"config_defination": {"skip_layers": ["fc"], "layers": {"fc": {"quant_enable": True}}}}, ConfigError,
     "config_defination.layers.fc.quant_enable: is true but the layer is listed in skip_layers"),
]


@pytest.mark.parametrize(("kwargs", "error", "expected"), CREATE_ERRORS, ids=[str(k) for k, _, _ in CREATE_ERRORS])
def test_create_quant_config_errors_leave_no_file(
        tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], expected: str) -> None:
    arguments: dict[str, Any] = {"config_file": tmp_path / "out" / "q.json", "model": make_model(),
                                 "input_data": INPUT, **kwargs}
    with pytest.raises(error) as info:
        create_quant_config(**arguments)
    assert expected in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_failure_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")
    monkeypatch.setattr(_io.os, "fsync", broken_fsync)
    with pytest.raises(ConfigError, match="config_file"):
        create_quant_config(tmp_path / "q.json", make_model(), INPUT)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("content", "expected"), [
    (None, "no such file"),
    ("{\n  \"version\": 1,\n  oops\n}", "line 3 column 3"),
    ('{"fc": {"quant_enable": true}, "fc": {"quant_enable": false}}', "duplicate key 'fc'"),
])
def test_load_file_errors(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "q.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        QuantConfig.load(path)
    assert "config_file" in str(info.value) and str(path) in str(info.value) and expected in str(info.value)


def test_load_directory_and_defination_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config_file.*directory"):
        QuantConfig.load(tmp_path)
    bad = tmp_path / "def.json"
    bad.write_text("[1,")
    with pytest.raises(ConfigError, match="config_defination.*line 1 column 4"):
        create_quant_config(tmp_path / "q.json", make_model(), INPUT, config_defination=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["def.json"]


def test_load_validation_error_names_the_file(tmp_path: Path, valid: dict[str, Any]) -> None:
    valid["batch_num"] = -1
    path = tmp_path / "q.json"
    path.write_text(json.dumps(valid))
    with pytest.raises(ConfigError, match=r"batch_num: must be >= 1.*q\.json"):
        QuantConfig.load(path)
