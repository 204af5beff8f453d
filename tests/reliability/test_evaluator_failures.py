"""Issue 8 §2: an evaluator that raises in the middle of a search, and KeyboardInterrupt."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from reliability_kit import (
    TinyEvaluator,
    check_files_sound,
    input_data,
    tiny_model,
    write_config,
)
from torch import nn

import amct_opt as amct
from amct_opt.errors import EvaluatorError
from amct_opt.strategies import OptunaSearch

pytestmark = pytest.mark.slow


class Flaky(TinyEvaluator):
    """Raises ``error`` from evaluate() on the call numbers in ``fail_on`` (1-based; float eval is 1)."""

    def __init__(self, model: nn.Module, fail_on: set[int] | range, error: type[BaseException] = RuntimeError) -> None:
        super().__init__(model)
        self.fail_on = fail_on
        self.error = error

    def evaluate(self, model: nn.Module) -> Any:
        if self.evaluate_calls + 1 in self.fail_on:
            self.evaluate_calls += 1
            raise self.error(f"flaky evaluator, call {self.evaluate_calls}")
        return super().evaluate(model)


class CalibrationInterrupted(TinyEvaluator):
    def calibration(self, model: nn.Module) -> None:
        self.calibration_calls += 1
        raise KeyboardInterrupt


@dataclass
class Folder:
    root: Path
    model: nn.Module

    def run(self, evaluator: Any, **kwargs: Any) -> amct.AutoCalibrationResult:
        with contextlib.chdir(self.root):
            return amct.accuracy_based_auto_calibration(
                self.model, evaluator, "quant.json", "record.txt", "out/net", input_data(), **kwargs
            )

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name="net", storage=f"sqlite:///{self.root / 'out' / 'amct_opt.db'}")

    def states(self) -> list[TrialState]:
        return [t.state for t in self.study().trials]

    def log(self) -> str:
        return (self.root / "amct_log" / "amct_onnx.log").read_text()


def make_folder(tmp: Path) -> Folder:
    model = tiny_model()
    write_config(tmp / "quant.json", model)
    return Folder(tmp, model)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> amct.AutoCalibrationResult:
    folder = make_folder(tmp_path_factory.mktemp("uninterrupted"))
    result = folder.run(TinyEvaluator(folder.model))
    assert result.reachable and 0 < sum(result.final_plan.values()) < len(result.final_plan)
    return result


def test_one_failing_evaluation_is_a_failed_trial_and_the_search_goes_on(
    tmp_path: Path, uninterrupted: amct.AutoCalibrationResult
) -> None:
    folder = make_folder(tmp_path)
    evaluator = Flaky(folder.model, fail_on={3})  # float, all-INT8, then the first roll-back fails
    result = folder.run(evaluator)
    states = folder.states()
    assert states.count(TrialState.FAIL) == 1 and states[1] == TrialState.FAIL
    failed = folder.study().trials[1]
    retried = [t for t in folder.study().trials if t.state == TrialState.COMPLETE and t.params == failed.params]
    assert len(retried) == 1  # the same config is evaluated again, once
    log = folder.log()
    assert "Traceback (most recent call last)" in log and "RuntimeError: flaky evaluator, call 3" in log
    assert result.final_plan == uninterrupted.final_plan
    assert check_files_sound(tmp_path) == []


def test_failures_beyond_max_failures_stop_the_search_and_a_rerun_resumes(
    tmp_path: Path, uninterrupted: amct.AutoCalibrationResult
) -> None:
    folder = make_folder(tmp_path)
    broken = Flaky(folder.model, fail_on=range(3, 100))  # every quantized evaluation after the first
    with pytest.raises(EvaluatorError, match=r"model_evaluator\.evaluate: failed 4 times \(max_failures=3\)"):
        folder.run(broken)
    assert folder.states() == [TrialState.COMPLETE] + [TrialState.FAIL] * 4
    assert folder.log().count("RuntimeError: flaky evaluator") == 4

    fixed = TinyEvaluator(folder.model)
    result = folder.run(fixed)
    assert None not in fixed.evaluated and fixed.calibration_calls == 0
    assert result.final_plan == uninterrupted.final_plan
    assert result.evaluations == uninterrupted.evaluations
    assert check_files_sound(tmp_path) == []


def test_max_failures_is_configurable(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    broken = Flaky(folder.model, fail_on=range(3, 100))
    with pytest.raises(EvaluatorError, match=r"failed 2 times \(max_failures=1\)"):
        folder.run(broken, strategy=OptunaSearch(max_failures=1, seed=0, show_progress=False))
    assert folder.states().count(TrialState.FAIL) == 2


def test_keyboard_interrupt_in_evaluate_leaves_a_resumable_study(
    tmp_path: Path, uninterrupted: amct.AutoCalibrationResult
) -> None:
    folder = make_folder(tmp_path)
    first = Flaky(folder.model, fail_on={4}, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        folder.run(first)
    assert folder.states() == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert "interrupted: every completed evaluation is stored" in folder.log()
    assert check_files_sound(tmp_path) == []

    second = TinyEvaluator(folder.model)
    result = folder.run(second)
    done = [plan for plan in first.evaluated + second.evaluated if plan is not None]
    assert len(done) == len(set(done))
    assert None not in second.evaluated and second.calibration_calls == 0
    assert result.final_plan == uninterrupted.final_plan


def test_keyboard_interrupt_in_calibration_keeps_the_float_metric(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    first = CalibrationInterrupted(folder.model)
    with pytest.raises(KeyboardInterrupt):
        folder.run(first)
    assert first.evaluated == [None]
    assert folder.study().user_attrs["float_metric"] == 0.0  # the float model matches its own outputs
    assert folder.study().trials == []
    second = TinyEvaluator(folder.model)
    folder.run(second)
    assert None not in second.evaluated  # the float evaluation is not repeated
    assert second.calibration_calls == 2
