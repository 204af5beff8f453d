"""Issue 8 §1: a table of bad inputs to accuracy_based_auto_calibration.

Each row must raise the package's own exception, name the offending argument
or key, raise before ``evaluate()`` where that is possible, and leave no file
behind (save_dir's folder, the record file, amct_log).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reliability_kit import TinyEvaluator, input_data, tiny_model, tree, write_config
from torch import nn

import amct_opt as amct
from amct_opt.errors import (
    AmctError,
    CalibrationError,
    ConfigError,
    EvaluatorError,
    InputError,
    StorageError,
    StrategyError,
    UnsupportedModelError,
)
from amct_opt.strategies import OptunaSearch

PASSWORD = "s3cretPW"


class Args(dict):
    """The call's keyword arguments, with the folder they live in."""

    root: Path


Mutate = Callable[[Args], None]


def config_edit(edit: Callable[[dict[str, Any]], None]) -> Mutate:
    """Rewrite the valid config file through ``edit``."""

    def mutate(args: Args) -> None:
        path = Path(args["config_file"])
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return mutate


def set_in(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def disable_all(data: dict[str, Any]) -> None:
    for name in ("conv", "down", "dw", "fc1", "fc2"):
        data[name]["quant_enable"] = False


def config_text(text: str) -> Mutate:
    def mutate(args: Args) -> None:
        Path(args["config_file"]).write_text(text)

    return mutate


def arg(name: str, value: Callable[[Args], Any]) -> Mutate:
    def mutate(args: Args) -> None:
        args[name] = value(args)

    return mutate


def regular_file(args: Args) -> Path:
    path = args.root / "a_file"
    path.write_text("not a folder")
    return path


def read_only_folder(args: Args) -> Path:
    folder = args.root / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def evaluator(kind: type[TinyEvaluator]) -> Mutate:
    return arg("model_evaluator", lambda args: kind(args["model"], target=1.0))


class ReturnsNone(TinyEvaluator):
    def evaluate(self, model: nn.Module) -> Any:
        super().evaluate(model)
        return None


class ReturnsNaN(TinyEvaluator):
    def evaluate(self, model: nn.Module) -> Any:
        super().evaluate(model)
        return math.nan


class ReturnsString(TinyEvaluator):
    def evaluate(self, model: nn.Module) -> Any:
        return str(super().evaluate(model))


class ReturnsBool(TinyEvaluator):
    def metric_eval(self, original_metric: float, new_metric: float) -> Any:
        return True


class ReturnsTriple(TinyEvaluator):
    def metric_eval(self, original_metric: float, new_metric: float) -> Any:
        return True, 0.0, "extra"


class ReturnsTextLoss(TinyEvaluator):
    def metric_eval(self, original_metric: float, new_metric: float) -> Any:
        return True, "small"


class NeverOk(TinyEvaluator):
    def metric_eval(self, original_metric: float, new_metric: float) -> Any:
        return False, 0.0


class NoMetricEval:
    def __init__(self) -> None:
        self.evaluate_calls = 0

    def calibration(self, model: nn.Module) -> None:
        model(input_data())

    def evaluate(self, model: nn.Module) -> float:
        self.evaluate_calls += 1
        return 0.0


@dataclass(frozen=True)
class Row:
    id: str
    mutate: Mutate
    error: type[AmctError]
    names: str  # a regex the message must match: the argument or key path
    evaluations: int = 0  # evaluate() calls allowed: 0 unless only evaluate() can reveal the problem
    needs_permissions: bool = False  # root ignores folder permissions: the row is skipped there


ROWS = [
    # -- config_file -------------------------------------------------------------------------
    Row("config-missing", arg("config_file", lambda a: a.root / "missing.json"), ConfigError, r"config_file.*missing\.json"),
    Row("config-is-folder", arg("config_file", lambda a: a.root), ConfigError, r"config_file.*directory"),
    Row("config-malformed-json", config_text('{"batch_num": 2,'), ConfigError, r"config_file.*not valid JSON"),
    Row("config-duplicate-key", config_text('{"batch_num": 1, "batch_num": 2}'), ConfigError, r"config_file.*duplicate key"),
    Row("config-not-an-object", config_text("[1, 2]"), ConfigError, r"top level: must be a JSON object"),
    Row("config-path-wrong-type", arg("config_file", lambda a: 3.5), InputError, r"config_file"),
    Row("batch_num-wrong-type", config_edit(set_in("batch_num", value="2")), ConfigError, r"batch_num: must be an integer"),
    Row("batch_num-zero", config_edit(set_in("batch_num", value=0)), ConfigError, r"batch_num: must be >= 1"),
    Row("quant_enable-wrong-type", config_edit(set_in("conv", "quant_enable", value="yes")), ConfigError, r"conv\.quant_enable"),
    Row("layer-entry-wrong-type", config_edit(set_in("fc1", value=[1])), ConfigError, r"fc1: must be a JSON object"),
    Row("unknown-layer", config_edit(set_in("features.9", value={"quant_enable": True})), ConfigError, r"features\.9.*not a quantizable layer"),
    Row("unknown-key", config_edit(set_in("conv", "activation_quant_params", "bitz", value=8)), ConfigError, r"conv\.activation_quant_params\.bitz: unknown key"),
    Row("act-num_bits-4", config_edit(set_in("conv", "activation_quant_params", "num_bits", value=4)), ConfigError, r"conv\.activation_quant_params\.num_bits: must be 8"),
    Row("wts-num_bits-16", config_edit(set_in("fc2", "weight_quant_params", "num_bits", value=16)), ConfigError, r"fc2\.weight_quant_params\.num_bits"),
    Row("max_percentile-low", config_edit(set_in("down", "activation_quant_params", "max_percentile", value=0.3)), ConfigError, r"down\.activation_quant_params\.max_percentile: must be in \(0\.5, 1\.0\]"),
    Row("min_percentile-high", config_edit(set_in("dw", "activation_quant_params", "min_percentile", value=1.5)), ConfigError, r"dw\.activation_quant_params\.min_percentile"),
    Row("search_range-reversed", config_edit(set_in("conv", "activation_quant_params", "search_range", value=[1.3, 0.7])), ConfigError, r"conv\.activation_quant_params\.search_range: must satisfy"),
    Row("search_range-wrong-type", config_edit(set_in("conv", "activation_quant_params", "search_range", value="wide")), ConfigError, r"search_range: must be a list of 2 numbers"),
    Row("search_step-zero", config_edit(set_in("conv", "activation_quant_params", "search_step", value=0)), ConfigError, r"search_step: must be > 0"),
    Row("num_of_bins-odd", config_edit(set_in("fc1", "activation_quant_params", value={"act_algo": "hfmg", "num_of_bins": 1000})), ConfigError, r"fc1\.activation_quant_params\.num_of_bins"),
    Row("ifmr-hfmg-mixed", config_edit(set_in("fc1", "activation_quant_params", "act_algo", value="hfmg")), ConfigError, r"fc1\.activation_quant_params\.\w+: is an IFMR key"),
    Row("skip_fusion-unknown-layer", config_edit(set_in("skip_fusion_layers", value=["bn9"])), ConfigError, r"skip_fusion_layers\[0\]: unknown layer 'bn9'"),
    Row("no-layer-enabled", config_edit(disable_all), ConfigError, r"config_file.*quant_enable"),
    Row("batch_num-above-calibration", config_edit(set_in("batch_num", value=5)), CalibrationError, r"batch_num is 5", evaluations=1),
    # -- save_dir / record_file ----------------------------------------------------------------
    Row("save_dir-no-prefix", arg("save_dir", lambda a: f"{a.root / 'out'}/"), InputError, r"save_dir.*no file-name prefix"),
    Row("save_dir-empty", arg("save_dir", lambda a: ""), InputError, r"save_dir"),
    Row("save_dir-a-folder", arg("save_dir", lambda a: a.root), InputError, r"save_dir.*is a folder"),
    Row("save_dir-under-a-file", arg("save_dir", lambda a: regular_file(a) / "net"), InputError, r"save_dir.*a_file.*is a file"),
    Row("save_dir-wrong-type", arg("save_dir", lambda a: 42), InputError, r"save_dir"),
    Row("save_dir-read-only-folder", arg("save_dir", lambda a: read_only_folder(a) / "net"), InputError,
        r"save_dir: folder .*locked.* is not writable", needs_permissions=True),
    # Not writable even by root (who ignores the row above's chmod): a process's /proc folder.
    Row("save_dir-unwritable-for-root-too", arg("save_dir", lambda a: "/proc/self/amct/net"), InputError,
        r"save_dir: folder '/proc/\d+' is not writable"),
    Row("record_file-under-a-file", arg("record_file", lambda a: regular_file(a) / "sub" / "rec.txt"), InputError, r"record_file.*is a file"),
    Row("record_file-a-folder", arg("record_file", lambda a: a.root), InputError, r"record_file.*folder"),
    Row("record_file-none", arg("record_file", lambda a: None), InputError, r"record_file"),
    # -- input_data ------------------------------------------------------------------------------
    Row("input-numpy", arg("input_data", lambda a: np.zeros((1, 1, 8, 8), np.float32)), InputError, r"input_data: expected a torch\.Tensor"),
    Row("input-list-of-ints", arg("input_data", lambda a: [1, 2]), InputError, r"input_data\[0\]"),
    Row("input-empty-tuple", arg("input_data", lambda a: ()), InputError, r"input_data"),
    Row("input-string", arg("input_data", lambda a: "image.png"), InputError, r"input_data"),
    Row("input-wrong-channels", arg("input_data", lambda a: torch.zeros(1, 3, 8, 8)), InputError, r"input_data: the model cannot run on it"),
    Row("input-wrong-size", arg("input_data", lambda a: torch.zeros(1, 1, 9, 9)), InputError, r"input_data: the model cannot run on it"),
    # -- model_evaluator -------------------------------------------------------------------------
    Row("evaluator-object", arg("model_evaluator", lambda a: object()), EvaluatorError, r"model_evaluator.*calibration.*evaluate.*metric_eval"),
    Row("evaluator-no-metric_eval", arg("model_evaluator", lambda a: NoMetricEval()), EvaluatorError, r"model_evaluator.*\['metric_eval'\]"),
    Row("evaluate-returns-none", evaluator(ReturnsNone), EvaluatorError, r"model_evaluator\.evaluate: expected a real number, got NoneType", evaluations=1),
    Row("evaluate-returns-nan", evaluator(ReturnsNaN), EvaluatorError, r"model_evaluator\.evaluate: expected a finite number", evaluations=1),
    Row("evaluate-returns-str", evaluator(ReturnsString), EvaluatorError, r"model_evaluator\.evaluate: expected a real number, got str", evaluations=1),
    Row("metric_eval-returns-bool", evaluator(ReturnsBool), EvaluatorError, r"model_evaluator\.metric_eval: expected a pair", evaluations=1),
    Row("metric_eval-returns-triple", evaluator(ReturnsTriple), EvaluatorError, r"model_evaluator\.metric_eval: expected a pair", evaluations=1),
    Row("metric_eval-text-loss", evaluator(ReturnsTextLoss), EvaluatorError, r"model_evaluator\.metric_eval: loss must be a number", evaluations=1),
    Row("metric_eval-orig-not-ok", evaluator(NeverOk), EvaluatorError, r"model_evaluator\.metric_eval: metric_eval\(orig, orig\)", evaluations=1),
    # -- strategy / sensitivity ------------------------------------------------------------------
    Row("strategy-unknown-name", arg("strategy", lambda a: "Bisect"), StrategyError, r"strategy: unknown name 'Bisect'"),
    Row("strategy-wrong-type", arg("strategy", lambda a: 42), StrategyError, r"strategy: expected .*got int"),
    Row("strategy-a-class", arg("strategy", lambda a: OptunaSearch), StrategyError, r"strategy"),
    Row("sensitivity-unknown-name", arg("sensitivity", lambda a: "cosine"), StrategyError, r"sensitivity: unknown name 'cosine'"),
    Row("sensitivity-a-class", arg("sensitivity", lambda a: amct.CosineSimilarity), StrategyError, r"sensitivity: expected .*got ABCMeta"),
    # -- model -----------------------------------------------------------------------------------
    Row("model-no-quantizable-layer", arg("model", lambda a: nn.Sequential(nn.ReLU())), UnsupportedModelError, r"model: no quantizable layer"),
    Row("model-not-a-module", arg("model", lambda a: lambda x: x), InputError, r"model: expected a torch\.nn\.Module"),
    # -- names and dynamic_axes ------------------------------------------------------------------
    Row("dynamic_axes-unknown-input", lambda a: a.update(input_names=["input"], dynamic_axes={"x": {0: "batch"}}), InputError, r"dynamic_axes: \['x'\]"),
    Row("dynamic_axes-without-names", arg("dynamic_axes", lambda a: {"input": {0: "batch"}}), InputError, r"dynamic_axes: \['input'\]"),
    Row("dynamic_axes-bad-axis", lambda a: a.update(input_names=["input"], dynamic_axes={"input": {"zero": "batch"}}), InputError, r"dynamic_axes\['input'\]"),
    Row("input_names-wrong-type", arg("input_names", lambda a: "input"), InputError, r"input_names"),
    # -- storage ---------------------------------------------------------------------------------
    Row("storage-unreachable", arg("strategy", lambda a: OptunaSearch(storage=f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:1/x")), StorageError, r"storage: cannot open 'postgresql\+psycopg://u:\*\*\*@127\.0\.0\.1:1/x'"),
    Row("storage-not-a-url", arg("strategy", lambda a: OptunaSearch(storage="no url here")), StorageError, r"storage: 'no url here' is not a SQLAlchemy URL"),
    Row("storage-sqlite-under-a-file", arg("strategy", lambda a: OptunaSearch(storage=f"sqlite:///{regular_file(a)}/x.db")), StorageError, r"storage: cannot open"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, str]:
    """The tiny model and its valid config text, made once (the library never changes the model)."""
    model = tiny_model()
    path = write_config(tmp_path_factory.mktemp("config") / "quant.json", model)
    return model, path.read_text()


@pytest.fixture()
def base_args(shared: tuple[nn.Module, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Args:
    monkeypatch.chdir(tmp_path)  # amct_log/ is created in the working directory
    model, config_text = shared
    (tmp_path / "quant.json").write_text(config_text)
    args = Args(
        model=model,
        model_evaluator=TinyEvaluator(model, target=1.0),
        config_file=str(tmp_path / "quant.json"),
        record_file=str(tmp_path / "out" / "record.txt"),
        save_dir=str(tmp_path / "out" / "net"),
        input_data=input_data(),
        strategy="BinarySearch",
    )
    args.root = tmp_path
    return args


def test_the_table_covers_at_least_30_rows() -> None:
    assert len(ROWS) >= 30
    assert len({row.id for row in ROWS}) == len(ROWS)


ROOT_SKIP = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions: chmod cannot block writes")


@pytest.mark.parametrize(
    "row", [pytest.param(row, id=row.id, marks=[ROOT_SKIP] if row.needs_permissions else []) for row in ROWS]
)
def test_bad_input(row: Row, base_args: Args) -> None:
    row.mutate(base_args)
    before = tree(base_args.root)
    with pytest.raises(AmctError) as info:
        amct.accuracy_based_auto_calibration(**base_args)
    assert type(info.value) is row.error, repr(info.value)
    assert re.search(row.names, str(info.value)), str(info.value)
    assert PASSWORD not in str(info.value) and PASSWORD not in repr(info.value.__cause__)
    calls = getattr(base_args["model_evaluator"], "evaluate_calls", 0)
    assert calls <= row.evaluations, f"evaluate() was called {calls} times"
    assert tree(base_args.root) == before, "files were left behind"
