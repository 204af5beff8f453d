"""The quant config: typed dataclasses, JSON round trip and validation.

File form (the reference's)::

    {
      "version": 1, "batch_num": 2, "activation_offset": true,
      "do_fusion": true, "skip_fusion_layers": [],
      "features.0.0": {
        "quant_enable": true,
        "activation_quant_params": {"num_bits": 8, "act_algo": "ifmr",
            "max_percentile": 0.999999, "min_percentile": 0.999999,
            "search_range": [0.7, 1.3], "search_step": 0.01, "asymmetric": true},
        "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": true}
      }
    }

HFMG activations use ``{"num_bits": 8, "act_algo": "hfmg", "num_of_bins": 4096, "asymmetric": true}``.

Every validation failure raises :class:`~amct_opt.errors.ConfigError` whose message
starts with the key path (``fc.activation_quant_params.search_step: must be > 0, got -1``)
and ends with where the data came from (``(in config_file 'q.json')``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from ._io import atomic_write_json
from .errors import ConfigError, InputError

__all__ = [
    "ActivationQuantParams",
    "WeightQuantParams",
    "LayerQuantConfig",
    "QuantConfig",
    "Validator",
    "read_json",
    "join_path",
    "names_hint",
    "as_path",
    "ACT_ALGOS",
    "NUM_OF_BINS",
    "WEIGHT_NUM_BITS",
    "IFMR_KEYS",
    "HFMG_KEYS",
]

ACT_ALGOS: tuple[str, ...] = ("ifmr", "hfmg")
NUM_OF_BINS: tuple[int, ...] = (1024, 2048, 4096, 8192)
#: Weight bit widths: 8, or 7 (stored as int8 in [-63, 63]; see :meth:`Validator.weight_num_bits`).
WEIGHT_NUM_BITS: tuple[int, ...] = (8, 7)
IFMR_KEYS: tuple[str, ...] = ("max_percentile", "min_percentile", "search_range", "search_step")
HFMG_KEYS: tuple[str, ...] = ("num_of_bins",)
_ACT_KEYS = ("num_bits", "act_algo", "asymmetric", *IFMR_KEYS, *HFMG_KEYS)
_WTS_KEYS = ("num_bits", "wts_algo", "channel_wise")
_LAYER_KEYS = ("quant_enable", "activation_quant_params", "weight_quant_params")
_TOP_KEYS = ("version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers")
_STEP_TOLERANCE = 1e-9


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def join_path(path: str, key: str | int) -> str:
    """``a.b`` + ``c`` -> ``a.b.c``; an int key gives ``a.b[2]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def names_hint(names: Sequence[str], limit: int = 5) -> str:
    """A few of ``names`` for an error message."""
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class Validator:
    """Type and range checks raising :class:`ConfigError` that name the key path and ``source``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> NoReturn:
        raise ConfigError(f"{path}: {message} (in {self.source})")

    def mapping(self, value: Any, path: str, allowed: Sequence[str] | None) -> Mapping[str, Any]:
        """A JSON object whose keys are strings from ``allowed`` (any string if None)."""
        if not isinstance(value, Mapping):
            self.fail(path, f"must be a JSON object, got {type(value).__name__} {_show(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(path, f"keys must be strings, got {_show(key)}")
            if allowed is not None and key not in allowed:
                self.fail(join_path(path, key), f"unknown key; allowed keys: {', '.join(allowed)}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {_show(value)}")
        return value

    def integer(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, got {_show(value)}")
        return value

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, f"must be a finite number, got {_show(value)}")
        return float(value)

    def choice(self, value: Any, path: str, allowed: Sequence[Any]) -> Any:
        if isinstance(value, bool) or value not in allowed:
            self.fail(path, f"must be one of {', '.join(_show(a) for a in allowed)}; got {_show(value)}")
        return value

    def num_bits(self, value: Any, path: str) -> int:
        if self.integer(value, path) != 8:
            self.fail(path, f"must be 8 (only INT8 is supported), got {value}")
        return 8

    def weight_num_bits(self, value: Any, path: str) -> int:
        """8, or 7: int8 weights in [-63, 63], which x86 u8s8 kernels without VNNI cannot saturate."""
        bits = self.integer(value, path)
        if bits not in WEIGHT_NUM_BITS:
            self.fail(
                path,
                f"must be 8, or 7 for weights that x86 CPUs without VNNI multiply without int16 "
                f"saturation (like ONNX Runtime's reduce_range), got {value}",
            )
        return bits

    def layer_names(self, value: Any, path: str, known: Sequence[str] | None) -> tuple[str, ...]:
        """A list of layer names, each in ``known`` when that is given."""
        if not isinstance(value, (list, tuple)):
            self.fail(path, f"must be a list of layer names, got {type(value).__name__} {_show(value)}")
        for index, name in enumerate(value):
            if not isinstance(name, str):
                self.fail(join_path(path, index), f"must be a layer name string, got {_show(name)}")
            if known is not None and name not in known:
                self.fail(join_path(path, index), f"unknown layer {name!r}; valid layers: {names_hint(known)}")
        return tuple(value)


@dataclass(frozen=True)
class ActivationQuantParams:
    """How one layer's input activation is calibrated (IFMR or HFMG)."""

    act_algo: str = "ifmr"  # "ifmr" | "hfmg"
    num_bits: int = 8
    asymmetric: bool = True
    # IFMR only
    max_percentile: float = 0.999999
    min_percentile: float = 0.999999
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = 0.01
    # HFMG only
    num_of_bins: int = 4096

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: only the keys of ``act_algo``."""
        if self.act_algo == "hfmg":
            return {"num_bits": self.num_bits, "act_algo": "hfmg",
                    "num_of_bins": self.num_of_bins, "asymmetric": self.asymmetric}
        return {"num_bits": self.num_bits, "act_algo": self.act_algo,
                "max_percentile": self.max_percentile, "min_percentile": self.min_percentile,
                "search_range": list(self.search_range), "search_step": self.search_step,
                "asymmetric": self.asymmetric}

    @classmethod
    def from_dict(cls, data: Any, *, path: str = "activation_quant_params",
                  default_asymmetric: bool = True, source: str = "config") -> ActivationQuantParams:
        """Validate ``activation_quant_params``; absent keys take the defaults."""
        check = Validator(source)
        data = check.mapping(data, path, _ACT_KEYS)

        def at(key: str) -> str:
            return join_path(path, key)

        algo = check.choice(data.get("act_algo", "ifmr"), at("act_algo"), ACT_ALGOS)
        foreign, kind = (HFMG_KEYS, "an HFMG") if algo == "ifmr" else (IFMR_KEYS, "an IFMR")
        for key in foreign:
            if key in data:
                check.fail(at(key), f"is {kind} key and cannot be mixed with act_algo {algo!r}")
        values: dict[str, Any] = {"act_algo": algo}
        if "num_bits" in data:
            values["num_bits"] = check.num_bits(data["num_bits"], at("num_bits"))
        values["asymmetric"] = check.boolean(data.get("asymmetric", default_asymmetric), at("asymmetric"))
        for key in ("max_percentile", "min_percentile"):
            if key in data:
                values[key] = check.number(data[key], at(key))
                if not 0.5 < values[key] <= 1.0:
                    check.fail(at(key), f"must be in (0.5, 1.0], got {data[key]}")
        if "search_range" in data:
            values["search_range"] = _search_range(check, data["search_range"], at("search_range"))
        if "search_step" in data:
            step = values["search_step"] = check.number(data["search_step"], at("search_step"))
            low, high = values.get("search_range", cls.search_range)
            if step <= 0:
                check.fail(at("search_step"), f"must be > 0, got {data['search_step']}")
            if high > low and step > high - low + _STEP_TOLERANCE:
                check.fail(at("search_step"), f"must be <= search_range width {high - low:g}, got {step}")
        if "num_of_bins" in data:
            values["num_of_bins"] = check.choice(data["num_of_bins"], at("num_of_bins"), NUM_OF_BINS)
        return cls(**values)


def _search_range(check: Validator, value: Any, path: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        check.fail(path, f"must be a list of 2 numbers [lo, hi], got {_show(value)}")
    low, high = (check.number(v, join_path(path, i)) for i, v in enumerate(value))
    if not 0 < low <= high:
        check.fail(path, f"must satisfy 0 < lo <= hi, got {_show(value)}")
    return (low, high)


@dataclass(frozen=True)
class WeightQuantParams:
    """How one layer's weight is quantized (ARQ, symmetric int8).

    ``num_bits`` 7 keeps the int8 weights in [-63, 63]: on x86 CPUs without VNNI,
    ONNX Runtime's u8s8 kernels add pairs of u8 x s8 products in int16
    (VPMADDUBSW), which 8-bit weights can overflow; 255 * 63 * 2 cannot.
    """

    num_bits: int = 8
    wts_algo: str = "arq_quantize"
    channel_wise: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"num_bits": self.num_bits, "wts_algo": self.wts_algo, "channel_wise": self.channel_wise}

    @classmethod
    def from_dict(cls, data: Any, *, path: str = "weight_quant_params",
                  default_channel_wise: bool = True, source: str = "config") -> WeightQuantParams:
        """Validate ``weight_quant_params``; absent keys take the defaults."""
        check = Validator(source)
        data = check.mapping(data, path, _WTS_KEYS)
        return cls(
            num_bits=check.weight_num_bits(data.get("num_bits", 8), join_path(path, "num_bits")),
            wts_algo=check.choice(data.get("wts_algo", "arq_quantize"), join_path(path, "wts_algo"),
                                  ("arq_quantize",)),
            channel_wise=check.boolean(data.get("channel_wise", default_channel_wise),
                                       join_path(path, "channel_wise")),
        )


@dataclass(frozen=True)
class LayerQuantConfig:
    """One layer's entry: whether it is quantized, and how."""

    quant_enable: bool = True
    activation: ActivationQuantParams = field(default_factory=ActivationQuantParams)
    weight: WeightQuantParams = field(default_factory=WeightQuantParams)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_enable": self.quant_enable,
                "activation_quant_params": self.activation.to_dict(),
                "weight_quant_params": self.weight.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, *, path: str, default_asymmetric: bool = True,
                  source: str = "config") -> LayerQuantConfig:
        """Validate one layer entry; ``quant_enable`` is required, the param dicts optional."""
        check = Validator(source)
        data = check.mapping(data, path, _LAYER_KEYS)
        if "quant_enable" not in data:
            check.fail(join_path(path, "quant_enable"), "is required (true or false)")
        return cls(
            quant_enable=check.boolean(data["quant_enable"], join_path(path, "quant_enable")),
            activation=ActivationQuantParams.from_dict(
                data.get("activation_quant_params", {}), path=join_path(path, "activation_quant_params"),
                default_asymmetric=default_asymmetric, source=source),
            weight=WeightQuantParams.from_dict(
                data.get("weight_quant_params", {}), path=join_path(path, "weight_quant_params"),
                source=source),
        )


@dataclass(frozen=True)
class QuantConfig:
    """A whole quant config; ``layers`` is keyed by module qualified name, in model order."""

    layers: dict[str, LayerQuantConfig]
    version: int = 1
    batch_num: int = 1
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: tuple[str, ...] = ()

    def enabled_layers(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.quant_enable]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the module docstring: top-level keys, then one entry per layer."""
        data: dict[str, Any] = {
            "version": self.version, "batch_num": self.batch_num,
            "activation_offset": self.activation_offset, "do_fusion": self.do_fusion,
            "skip_fusion_layers": list(self.skip_fusion_layers),
        }
        data.update((name, layer.to_dict()) for name, layer in self.layers.items())
        return data

    @classmethod
    def from_dict(cls, data: Any, *, model_layers: Collection[str] | None = None,
                  source: str = "config") -> QuantConfig:
        """Validate the JSON form; every key that is not a top-level key is a layer entry.

        With ``model_layers``, entries must name model layers, layers are ordered as in
        the model, and model layers missing from ``data`` get ``quant_enable`` false.
        """
        check = Validator(source)
        data = check.mapping(data, "top level", None)
        known = list(model_layers) if model_layers is not None else None
        if "version" in data and (check.integer(data["version"], "version") != 1):
            check.fail("version", f"must be 1 (the only config version), got {data['version']}")
        batch_num = check.integer(data.get("batch_num", 1), "batch_num")
        if batch_num < 1:
            check.fail("batch_num", f"must be >= 1, got {batch_num}")
        offset = check.boolean(data.get("activation_offset", True), "activation_offset")
        entries = {key: value for key, value in data.items() if key not in _TOP_KEYS}
        if known is not None:
            for name in entries:
                if name not in known:
                    check.fail(name, f"not a quantizable layer of the model; valid layers: {names_hint(known)}")
        layers = {name: LayerQuantConfig.from_dict(entry, path=name, default_asymmetric=offset, source=source)
                  for name, entry in entries.items()}
        if known is not None:
            missing = LayerQuantConfig(False, ActivationQuantParams(asymmetric=offset))
            layers = {name: layers.get(name, missing) for name in known}
        return cls(
            layers=layers,
            batch_num=batch_num,
            activation_offset=offset,
            do_fusion=check.boolean(data.get("do_fusion", True), "do_fusion"),
            skip_fusion_layers=check.layer_names(data.get("skip_fusion_layers", []), "skip_fusion_layers", known),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON form to ``path`` atomically."""
        target = as_path(path, "config_file")
        try:
            atomic_write_json(target, self.to_dict())
        except OSError as exc:
            raise ConfigError(f"config_file: cannot write {str(target)!r}: {exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str], model_layers: Collection[str] | None = None) -> QuantConfig:
        """Read and validate a config file (see :meth:`from_dict`)."""
        target = as_path(path, "config_file")
        return cls.from_dict(read_json(target, "config_file"), model_layers=model_layers,
                             source=f"config_file {str(target)!r}")

    def with_plan(self, plan: Mapping[str, bool]) -> QuantConfig:
        """A copy whose ``quant_enable`` follows ``plan`` for the layers it names."""
        if not isinstance(plan, Mapping):
            raise InputError(f"plan: must be a mapping of layer name to bool, got {type(plan).__name__}")
        for name, enable in plan.items():
            if name not in self.layers:
                raise InputError(f"plan: unknown layer {name!r}; valid layers: {names_hint(list(self.layers))}")
            if not isinstance(enable, bool):
                raise InputError(f"plan[{name!r}]: must be true or false, got {_show(enable)}")
        layers = {name: replace(layer, quant_enable=plan[name]) if name in plan else layer
                  for name, layer in self.layers.items()}
        return replace(self, layers=layers)

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSON form."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def as_path(path: Any, arg: str) -> Path:
    """``path`` as a Path; anything but a non-empty str or PathLike is an InputError naming ``arg``."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InputError(f"{arg}: must be a non-empty path (str or os.PathLike), got {_show(path)}")
    return Path(path)


def _no_duplicates(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def read_json(path: str | os.PathLike[str], arg: str) -> Any:
    """Parse a JSON file; any failure is a :class:`ConfigError` naming ``arg`` and the path."""
    target = as_path(path, arg)
    if target.is_dir():
        raise ConfigError(f"{arg}: {str(target)!r} is a directory, expected a JSON file")
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{arg}: no such file {str(target)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{arg}: cannot read {str(target)!r}: {exc}") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{arg}: {str(target)!r} is not valid JSON: {exc.msg} "
                          f"at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise ConfigError(f"{arg}: {str(target)!r} is not valid JSON: {exc}") from None
