"""strategy=OptunaSearch end to end on the conftest SmallNet: samplers, stored attributes, progress, reuse."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import DigitsEvaluator, Trained
from search_run import N_TRIALS, TARGET, SearchedRun, searched_run, small_data

import amct_opt as amct
from amct_opt.strategies import OptunaSearch
from amct_opt.strategies.optuna_search import SAMPLER_NAMES
from amct_opt.trials import CONSTRAINT_KEY, FLOAT, INT8


@pytest.fixture()
def run(tmp_path_factory: pytest.TempPathFactory, trained: Trained) -> SearchedRun:
    return searched_run(tmp_path_factory, trained)


def copy_study(run: SearchedRun, folder: Path) -> str:
    """A private copy of the shared run's SQLite study, to continue without touching the original."""
    shutil.copy(run.folder / "amct_opt.db", folder / "copy.db")
    return f"sqlite:///{(folder / 'copy.db').as_posix()}"


def resume(run: SearchedRun, storage: str, folder: Path, strategy: OptunaSearch, trained: Trained) -> tuple[
        amct.AutoCalibrationResult, DigitsEvaluator]:
    evaluator = DigitsEvaluator(small_data(trained), TARGET)
    result = amct.accuracy_based_auto_calibration(
        run.model, evaluator, str(run.config_file), str(folder / "record.txt"), str(folder / "out" / "small"),
        run.input_data, strategy=strategy,
    )
    return result, evaluator


def test_search_finds_a_feasible_config_and_evaluates_each_once(run: SearchedRun) -> None:
    result, evaluator = run.result, run.evaluator
    assert result.reachable and 0.0 < result.quantized_share < 1.0
    ok, _ = evaluator.metric_eval(result.float_metric, result.final_metric)
    assert ok
    study = optuna.load_study(study_name=run.study_name, storage=run.storage)
    evaluated = [t for t in study.trials if t.state.name == "COMPLETE" and "cached_from" not in t.user_attrs]
    plans = [tuple(sorted(t.params.items())) for t in evaluated]
    assert len(plans) == len(set(plans)) == result.evaluations
    assert result.evaluations == N_TRIALS or result.stop_reason == "strategy finished"
    # One evaluate() for the float model, one per evaluated plan except the all-float one (free).
    quantizing = [t for t in evaluated if INT8 in t.params.values()]
    assert evaluator.evaluate_calls == 1 + len(quantizing)
    assert evaluator.calibration_calls == 2  # calibration, then the sensitivity ranking


def test_trials_carry_the_constraint_and_the_export_is_feasible(run: SearchedRun) -> None:
    study = optuna.load_study(study_name=run.study_name, storage=run.storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    for trial in complete:
        assert trial.constraints == {CONSTRAINT_KEY: 0.0 if trial.user_attrs["ok"] else 1.0}
    final_plan = run.result.final_plan
    assert final_plan is not None
    chosen = [t for t in complete if {n: v == INT8 for n, v in t.params.items()} == final_plan]
    assert chosen and all(t.user_attrs["ok"] for t in chosen)
    assert max(t.value for t in complete if t.user_attrs["ok"]) == pytest.approx(run.result.quantized_share)
    config = json.loads(Path(run.result.paths["final_config"]).read_text())
    assert {name: config[name]["quant_enable"] for name in final_plan} == final_plan


def test_plain_optuna_reads_the_study_back(run: SearchedRun) -> None:
    study = optuna.load_study(study_name=run.study_name, storage=run.storage)
    attrs = study.user_attrs
    assert attrs["float_metric"] == pytest.approx(run.result.float_metric)
    assert attrs["all_quant_metric"] == pytest.approx(run.result.all_quant_metric)
    layers = attrs["layers"]
    assert layers == ["conv1", "conv2", "dw", "pw", "conv3", "fc1", "fc2"]
    assert set(attrs["ranking"]) == set(layers) and all(0.0 <= v <= 1.0 for v in attrs["ranking"].values())
    assert set(attrs["costs"]) == set(layers)
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert set(trial.params) == set(layers) and set(trial.params.values()) <= {INT8, FLOAT}
        for key in ("metric", "loss", "ok", "n_quantized", "quant_share_macs", "quant_share_params",
                    "quant_share_layers", "source", "fingerprint"):
            assert key in trial.user_attrs, key
        assert trial.value == pytest.approx(trial.user_attrs["quant_share_macs"])


def test_progress_lines_follow_show_progress(run: SearchedRun, tmp_path: Path, trained: Trained,
                                             caplog: pytest.LogCaptureFixture) -> None:
    storage = copy_study(run, tmp_path)
    caplog.set_level(logging.INFO, logger="amct_opt")
    quiet, evaluator = resume(run, storage, tmp_path / "quiet",
                              OptunaSearch(n_trials=N_TRIALS + 1, seed=0, storage=storage, study_name="small",
                                           show_progress=False), trained)
    assert quiet.evaluations_this_run <= 1
    assert evaluator.calibration_calls == 0  # calibration and ranking come from the study
    assert not [r for r in caplog.records if r.name == "amct_opt.search"]
    caplog.clear()
    loud, _ = resume(run, storage, tmp_path / "loud",
                     OptunaSearch(n_trials=N_TRIALS + 2, seed=0, storage=storage, study_name="small",
                                  show_progress=True), trained)
    lines = [r.getMessage() for r in caplog.records if r.name == "amct_opt.search"]
    if loud.evaluations_this_run:
        assert any("best feasible" in line and "ETA" in line and f"/{N_TRIALS + 2}]" in line for line in lines)


@pytest.mark.slow
def test_every_named_sampler_runs_end_to_end(run: SearchedRun, tmp_path: Path, trained: Trained) -> None:
    storage = copy_study(run, tmp_path)
    budget = run.result.evaluations
    for name in SAMPLER_NAMES:
        budget += 2
        strategy = OptunaSearch(name, n_trials=budget, seed=0, storage=storage, study_name="small",
                                guided=False, show_progress=False)
        result, evaluator = resume(run, storage, tmp_path / name, strategy, trained)
        assert evaluator.calibration_calls == 0, name
        assert Path(result.paths["deploy_model"]).is_file(), name
        study = optuna.load_study(study_name="small", storage=storage)
        assert any(t.user_attrs.get("source") == "sampler" and t.state.name == "COMPLETE"
                   for t in study.trials[-3:]), name
        assert result.evaluations <= budget, name
