"""Issue 8 §5: the same seed and data give the same final config and a byte-identical record file."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from reliability_kit import TinyEvaluator, input_data, tiny_model, write_config

import amct_opt as amct
from amct_opt.strategies import OptunaSearch

pytestmark = pytest.mark.slow

FILES = [
    "record.txt",
    "out/accuracy_based_auto_calibration_final_config.json",
    "out/accuracy_based_auto_calibration_ranking_information.json",
    "out/net_quant.json",
    "out/net_fake_quant_model.onnx",
    "out/net_deploy_model.onnx",
]


def run(folder: Path, strategy: Any) -> tuple[amct.AutoCalibrationResult, list[dict[str, str]]]:
    folder.mkdir()
    model = tiny_model()
    write_config(folder / "quant.json", model)
    with contextlib.chdir(folder):
        result = amct.accuracy_based_auto_calibration(
            model, TinyEvaluator(model), "quant.json", "record.txt", "out/net", input_data(), strategy=strategy()
        )
    study = optuna.load_study(study_name="net", storage=f"sqlite:///{folder / 'out' / 'amct_opt.db'}")
    return result, [t.params for t in study.trials]


@pytest.mark.parametrize(
    "strategy",
    [lambda: "BinarySearch", lambda: OptunaSearch(seed=7, n_trials=9, show_progress=False)],
    ids=["binary_search", "optuna_seed7"],
)
def test_two_fresh_runs_write_identical_outputs(tmp_path: Path, strategy: Any) -> None:
    first, first_trials = run(tmp_path / "first", strategy)
    second, second_trials = run(tmp_path / "second", strategy)
    assert first.final_plan == second.final_plan and first.final_plan is not None
    assert first_trials == second_trials  # the same configs, in the same order
    for name in FILES:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    history = "amct_log/accuracy_based_auto_calibration_record.json"
    assert json.loads((tmp_path / "first" / history).read_text()) == json.loads((tmp_path / "second" / history).read_text())
