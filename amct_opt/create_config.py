"""``create_quant_config``: write a model's quant config file (the reference's entry point).

Every quantizable layer (see :mod:`amct_opt.layers`) gets an entry with IFMR activation
defaults and ARQ weights, ``channel_wise`` true for convolutions and false for ``nn.Linear``.

``config_defination`` is an optional JSON file (or an already parsed mapping) of overrides.
Every key is optional; a key that is present overrides the matching keyword argument::

    {
      "batch_num": 4,                     # int >= 1
      "activation_offset": false,         # default "asymmetric" of every layer's activations
      "do_fusion": true,
      "skip_fusion_layers": ["features.0"],
      "skip_layers": ["classifier"],      # these layers get "quant_enable": false
      "activation_quant_params": {"search_step": 0.02},   # defaults for all layers
      "weight_quant_params": {"channel_wise": true},       # defaults for all layers
      "layers": {                         # per-layer overrides, keyed by qualified name
        "fc": {"quant_enable": true,
               "activation_quant_params": {"act_algo": "hfmg", "num_of_bins": 2048},
               "weight_quant_params": {"channel_wise": false}}
      }
    }

Per-layer param keys override the global ones key by key; when a layer sets ``act_algo``,
global keys that belong to the other algorithm (IFMR: max_percentile, min_percentile,
search_range, search_step; HFMG: num_of_bins) are not inherited. A layer listed in
``skip_layers`` may not set ``quant_enable`` true. Errors are :class:`ConfigError` with
key paths prefixed ``config_defination.``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .config import (
    HFMG_KEYS,
    IFMR_KEYS,
    ActivationQuantParams,
    LayerQuantConfig,
    QuantConfig,
    Validator,
    WeightQuantParams,
    as_path,
    join_path,
    names_hint,
    read_json,
)
from .errors import InputError, UnsupportedModelError
from .layers import find_quantizable_layers, is_conv

__all__ = ["create_quant_config"]

_ROOT = "config_defination"
_DEFINATION_KEYS = ("batch_num", "activation_offset", "do_fusion", "skip_fusion_layers", "skip_layers",
                    "activation_quant_params", "weight_quant_params", "layers")
_LAYER_KEYS = ("quant_enable", "activation_quant_params", "weight_quant_params")


@dataclass(frozen=True)
class _Settings:
    """The keyword arguments, then the config_defination overrides, once validated."""

    batch_num: int
    activation_offset: bool
    skip_layers: tuple[str, ...]
    do_fusion: bool = True
    skip_fusion_layers: tuple[str, ...] = ()
    activation: Mapping[str, Any] = field(default_factory=dict)
    weight: Mapping[str, Any] = field(default_factory=dict)
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "create_quant_config"


def create_quant_config(
    config_file: str | os.PathLike[str],
    model: nn.Module,
    input_data: torch.Tensor | tuple[torch.Tensor, ...],
    skip_layers: Sequence[str] | None = None,
    batch_num: int = 1,
    activation_offset: bool = True,
    config_defination: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> QuantConfig:
    """Build the quant config of ``model``, write it atomically to ``config_file`` and return it.

    ``input_data`` (a tensor or tuple of tensors) is checked but only kept for API
    compatibility. ``config_defination`` is the override file of the module docstring.
    Nothing is written unless every argument is valid.
    """
    target = as_path(config_file, "config_file")
    if target.is_dir():
        raise InputError(f"config_file: {str(target)!r} is a directory, expected a file path")
    if not isinstance(model, nn.Module):
        raise InputError(f"model: must be a torch.nn.Module, got {type(model).__name__}")
    _check_input_data(input_data)
    modules = find_quantizable_layers(model)
    if not modules:
        raise UnsupportedModelError(
            f"model: {type(model).__name__} has no quantizable layer "
            "(Conv1d/2d/3d, ConvTranspose1d/2d or Linear)")
    names = list(modules)
    check = Validator("create_quant_config arguments")
    settings = _Settings(
        batch_num=_batch_num(check, batch_num, "batch_num"),
        activation_offset=check.boolean(activation_offset, "activation_offset"),
        skip_layers=check.layer_names([] if skip_layers is None else skip_layers, "skip_layers", names),
    )
    if config_defination is not None:
        settings = _apply_defination(settings, config_defination, names)
    config = QuantConfig(
        layers={name: _layer_config(settings, name, module) for name, module in modules.items()},
        batch_num=settings.batch_num,
        activation_offset=settings.activation_offset,
        do_fusion=settings.do_fusion,
        skip_fusion_layers=settings.skip_fusion_layers,
    )
    config.save(target)
    return config


def _check_input_data(input_data: Any) -> None:
    items = input_data if isinstance(input_data, tuple) else (input_data,)
    if not items or not all(isinstance(item, torch.Tensor) for item in items):
        raise InputError("input_data: must be a torch.Tensor or a non-empty tuple of tensors, "
                         f"got {type(input_data).__name__}")


def _batch_num(check: Validator, value: Any, path: str) -> int:
    if check.integer(value, path) < 1:
        check.fail(path, f"must be >= 1, got {value}")
    return value


def _apply_defination(settings: _Settings, source: Any, names: list[str]) -> _Settings:
    """``settings`` updated with the validated keys of the config_defination file or mapping."""
    if isinstance(source, Mapping):
        data, where = source, _ROOT
    else:
        data, where = read_json(source, _ROOT), f"{_ROOT} {os.fspath(source)!r}"
    check = Validator(where)
    data = check.mapping(data, _ROOT, _DEFINATION_KEYS)

    def at(key: str) -> str:
        return join_path(_ROOT, key)

    values: dict[str, Any] = {"source": where}
    if "batch_num" in data:
        values["batch_num"] = _batch_num(check, data["batch_num"], at("batch_num"))
    for key in ("activation_offset", "do_fusion"):
        if key in data:
            values[key] = check.boolean(data[key], at(key))
    for key in ("skip_layers", "skip_fusion_layers"):
        if key in data:
            values[key] = check.layer_names(data[key], at(key), names)
    if "activation_quant_params" in data:
        values["activation"] = data["activation_quant_params"]
        ActivationQuantParams.from_dict(values["activation"], path=at("activation_quant_params"), source=where)
    if "weight_quant_params" in data:
        values["weight"] = data["weight_quant_params"]
        WeightQuantParams.from_dict(values["weight"], path=at("weight_quant_params"), source=where)
    if "layers" in data:
        values["layers"] = layers = check.mapping(data["layers"], at("layers"), None)
        for name, entry in layers.items():
            path = join_path(at("layers"), name)
            if name not in names:
                check.fail(path, f"not a quantizable layer of the model; valid layers: {names_hint(names)}")
            entry = check.mapping(entry, path, _LAYER_KEYS)
            if "quant_enable" in entry:
                check.boolean(entry["quant_enable"], join_path(path, "quant_enable"))
    return replace(settings, **values)


def _layer_config(settings: _Settings, name: str, module: nn.Module) -> LayerQuantConfig:
    """One layer's entry: global defaults, then its per-layer overrides."""
    check = Validator(settings.source)
    override = settings.layers.get(name, {})
    path = join_path(join_path(_ROOT, "layers"), name)
    skipped = name in settings.skip_layers
    if override.get("quant_enable") is True and skipped:
        check.fail(join_path(path, "quant_enable"), "is true but the layer is listed in skip_layers")
    act_path, wts_path = (join_path(path if key in override else _ROOT, key)
                          for key in ("activation_quant_params", "weight_quant_params"))
    act_override = check.mapping(override.get("activation_quant_params", {}), act_path, None)
    wts_override = check.mapping(override.get("weight_quant_params", {}), wts_path, None)
    return LayerQuantConfig(
        quant_enable=override.get("quant_enable", True) and not skipped,
        activation=ActivationQuantParams.from_dict(
            _merge_activation(settings.activation, act_override), path=act_path,
            default_asymmetric=settings.activation_offset, source=settings.source),
        weight=WeightQuantParams.from_dict(
            {**settings.weight, **wts_override}, path=wts_path,
            default_channel_wise=is_conv(module), source=settings.source),
    )


def _merge_activation(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, minus base keys of the algorithm ``override`` does not use."""
    algo = override.get("act_algo")
    if algo is None:
        return {**base, **override}
    foreign = HFMG_KEYS if algo == "ifmr" else IFMR_KEYS
    return {**{key: value for key, value in base.items() if key not in foreign}, **override}
