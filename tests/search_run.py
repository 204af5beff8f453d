"""One OptunaSearch run on the conftest SmallNet, shared by the strategy, export, report and CLI tests.

``searched_run(tmp_path_factory, trained)`` runs it once per test session
(cached here: a fixture imported into several modules would run once per
module) and returns where everything went.

The metric is the logits' distortion from the float model's (minus their
mean squared difference): it grows with every quantized layer, unlike the
test log-likelihood, which barely moves on this small net.  The run has two
calls on one study.  The first, with a target no quantized config meets and
a budget of one evaluation, stores the float metric, the calibration, the
ranking and the all-INT8 result.  The second sets the target to a fraction of
the all-INT8 loss read from the study, so that the all-INT8 model misses it
and partial configs meet it whatever the trained weights are; it reuses
everything the first call stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import DigitsEvaluator, Trained

import amct_opt as amct
from amct_opt.strategies import OptunaSearch

#: The second call's target, as a fraction of the all-INT8 loss.
TARGET_FRACTION = 0.5
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
    target: float
    #: The first call's evaluator (float model, calibration, ranking, all-INT8) and the second's.
    probe: DistortionEvaluator
    evaluator: DistortionEvaluator
    result: amct.AutoCalibrationResult

    def new_evaluator(self, trained: Trained, target: float | None = None) -> DistortionEvaluator:
        return DistortionEvaluator(small_data(trained), self.target if target is None else target)


_RUNS: dict[Path, SearchedRun] = {}


class DistortionEvaluator(DigitsEvaluator):
    """Metric: minus the mean squared difference of the logits from the float model's."""

    def __init__(self, data: Trained, target: float) -> None:
        super().__init__(data, target)
        with torch.no_grad():
            self.reference = data.model(data.test_x)

    def evaluate(self, model: torch.nn.Module) -> float:
        self.evaluate_calls += 1
        with torch.no_grad():
            return -float(((model(self.data.test_x) - self.reference) ** 2).mean())


def small_data(trained: Trained) -> Trained:
    """The trained SmallNet with a smaller test split: evaluations stay fast."""
    return Trained(trained.model, trained.train_x, trained.train_y,
                   trained.test_x[:TEST_DIGITS], trained.test_y[:TEST_DIGITS])


def searched_run(tmp_path_factory: pytest.TempPathFactory, trained: Trained) -> SearchedRun:
    base = tmp_path_factory.getbasetemp()
    if base in _RUNS:
        return _RUNS[base]
    folder = tmp_path_factory.mktemp("optuna_run")
    config_file = folder / "config.json"
    input_data = trained.train_x[:1]
    amct.create_quant_config(str(config_file), trained.model, input_data, batch_num=2)
    storage = f"sqlite:///{(folder / 'amct_opt.db').as_posix()}"

    def call(evaluator: DistortionEvaluator, n_trials: int) -> amct.AutoCalibrationResult:
        return amct.accuracy_based_auto_calibration(
            trained.model, evaluator, str(config_file), str(folder / "record.txt"),
            str(folder / "results" / STUDY), input_data,
            strategy=OptunaSearch(n_trials=n_trials, seed=0, storage=storage, show_progress=False),
        )

    probe = DistortionEvaluator(small_data(trained), 1e-12)
    first = call(probe, 1)
    target = TARGET_FRACTION * abs(first.all_quant_metric - first.float_metric)
    evaluator = DistortionEvaluator(small_data(trained), target)
    result = call(evaluator, N_TRIALS)
    _RUNS[base] = SearchedRun(folder, storage, STUDY, config_file, folder / "results" / STUDY,
                              input_data, trained.model, target, probe, evaluator, result)
    return _RUNS[base]
