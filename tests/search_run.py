"""One OptunaSearch run on the conftest SmallNet, shared by the strategy, export, report and CLI tests.

``searched_run(tmp_path_factory, trained)`` runs it once per test session
(cached here: a fixture imported into several modules would run once per
module) and returns where everything went.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import DigitsEvaluator, Trained

import amct_opt as amct
from amct_opt.strategies import OptunaSearch

#: Allowed drop in mean log-likelihood: the all-INT8 SmallNet misses it, a partial config meets it.
TARGET = 1e-4
N_TRIALS = 9
TEST_DIGITS = 300
STUDY = "small"


@dataclass(frozen=True)
class SearchedRun:
    folder: Path
    storage: str
    study_name: str
    config_file: Path
    save_dir: Path
    input_data: torch.Tensor
    model: torch.nn.Module
    evaluator: DigitsEvaluator
    result: amct.AutoCalibrationResult


_RUNS: dict[Path, SearchedRun] = {}


def small_data(trained: Trained) -> Trained:
    """The trained SmallNet with a smaller test split: evaluations stay fast."""
    return Trained(trained.model, trained.train_x, trained.train_y,
                   trained.test_x[:TEST_DIGITS], trained.test_y[:TEST_DIGITS])


def searched_run(tmp_path_factory: pytest.TempPathFactory, trained: Trained) -> SearchedRun:
    base = tmp_path_factory.getbasetemp()
    if base not in _RUNS:
        folder = tmp_path_factory.mktemp("optuna_run")
        config_file = folder / "config.json"
        input_data = trained.train_x[:1]
        amct.create_quant_config(str(config_file), trained.model, input_data, batch_num=2)
        evaluator = DigitsEvaluator(small_data(trained), TARGET)
        storage = f"sqlite:///{(folder / 'amct_opt.db').as_posix()}"
        result = amct.accuracy_based_auto_calibration(
            trained.model, evaluator, str(config_file), str(folder / "record.txt"),
            str(folder / "results" / STUDY), input_data,
            strategy=OptunaSearch(n_trials=N_TRIALS, seed=0, storage=storage, show_progress=False),
        )
        _RUNS[base] = SearchedRun(folder, storage, STUDY, config_file, folder / "results" / STUDY,
                                  input_data, trained.model, evaluator, result)
    return _RUNS[base]
