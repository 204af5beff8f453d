"""strategy=OptunaSearch end to end on the conftest SmallNet: samplers, stored attributes, progress, reuse."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import Trained
from search_run import N_TRIALS, DistortionEvaluator, SearchedRun, searched_run

import amct_opt as amct
from amct_opt.report import write_report
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


def resume(run: SearchedRun, folder: Path, strategy: OptunaSearch, trained: Trained,
           target: float | None = None) -> tuple[amct.AutoCalibrationResult, DistortionEvaluator]:
    """The shared run's call again, with ``strategy`` (and optionally another target)."""
    evaluator = run.new_evaluator(trained, target)
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
    # The first call evaluated the float model and the all-INT8 one, calibrated and ranked (the
    # two calibration() calls); the second reused all of that and evaluated each other plan once,
    # except the all-float one, which the float metric answers.
    assert (run.probe.evaluate_calls, run.probe.calibration_calls) == (2, 2)
    quantizing = [t for t in evaluated if INT8 in t.params.values()]
    assert evaluator.evaluate_calls == len(quantizing) - 1
    assert evaluator.calibration_calls == 0


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
    quiet, evaluator = resume(run, tmp_path / "quiet",
                              OptunaSearch(n_trials=N_TRIALS + 1, seed=0, storage=storage, study_name="small",
                                           show_progress=False), trained)
    assert quiet.evaluations_this_run <= 1
    assert evaluator.calibration_calls == 0  # calibration and ranking come from the study
    assert not [r for r in caplog.records if r.name == "amct_opt.search"]
    caplog.clear()
    # The default budget, set when the search starts, shows in the progress lines with an ETA.
    loud, _ = resume(run, tmp_path / "loud",
                     OptunaSearch(seed=0, storage=storage, study_name="small", show_progress=True),
                     trained, target=0.6 * run.target)
    budget = OptunaSearch.default_budget(7)
    assert loud.evaluations_this_run > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "amct_opt.search"]
    assert any(f"/{budget}] trial" in line and "best feasible" in line and "ETA" in line for line in lines)


@pytest.mark.slow
def test_every_named_sampler_runs_end_to_end(run: SearchedRun, tmp_path: Path, trained: Trained) -> None:
    storage = copy_study(run, tmp_path)
    budget = run.result.evaluations
    for name in SAMPLER_NAMES:
        budget += 1
        before = len(optuna.load_study(study_name="small", storage=storage).trials)
        strategy = OptunaSearch(name, n_trials=budget, seed=0, storage=storage, study_name="small",
                                guided=False, warm_start=False, show_progress=False)  # the sampler's turns only
        # A stricter target than the shared run's: the optimum cannot be proven within the budget.
        result, evaluator = resume(run, tmp_path / name, strategy, trained, target=0.6 * run.target)
        assert evaluator.calibration_calls == 0, name
        assert Path(result.paths["deploy_model"]).is_file() == result.reachable, name
        new = optuna.load_study(study_name="small", storage=storage).trials[before:]
        assert any(t.user_attrs.get("source") == "sampler" and t.state.name == "COMPLETE" for t in new), name
        assert result.evaluations == budget, name


def test_strategy_optuna_by_name_runs_with_the_defaults(run: SearchedRun, tmp_path: Path, trained: Trained,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amct_opt")
    evaluator = run.new_evaluator(trained)
    with contextlib.chdir(tmp_path):
        result = amct.accuracy_based_auto_calibration(
            run.model, evaluator, str(run.config_file), "record.txt", "out/small", run.input_data, strategy="optuna",
        )
    # The default storage and study name: amct_opt.db beside the outputs, the prefix.
    storage = f"sqlite:///{(tmp_path / 'out' / 'amct_opt.db').as_posix()}"
    assert result.study_name == "small" and result.storage == storage
    study = optuna.load_study(study_name="small", storage=storage)
    # The default budget, the warm start, a feasible best trial exported.
    budget = OptunaSearch.default_budget(7)
    assert result.evaluations == budget or result.stop_reason == "strategy finished"
    assert result.evaluations <= budget
    sources = [t.user_attrs.get("source") for t in study.trials]
    assert sources[0] == "all_quant" and sources[1] == "warm_start:binary_search"
    assert result.reachable and (tmp_path / result.paths["deploy_model"]).is_file()
    assert (tmp_path / "out" / "small_fake_quant_model.onnx").is_file()
    assert evaluator.calibration_calls == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "amct_opt.search"]
    assert any(f"/{budget}] trial" in line and "ETA" in line for line in lines)  # progress is on by default


def test_multi_objective_returns_the_pareto_front(run: SearchedRun, tmp_path: Path, trained: Trained) -> None:
    url = f"sqlite:///{(tmp_path / 'pareto.db').as_posix()}"
    storage = optuna.storages.RDBStorage(url)  # an Optuna storage object, not a URL
    evaluator = run.new_evaluator(trained)
    with contextlib.chdir(tmp_path):
        result = amct.accuracy_based_auto_calibration(
            run.model, evaluator, str(run.config_file), "record.txt", "out/small", run.input_data,
            strategy=OptunaSearch(n_trials=12, seed=0, storage=storage, study_name="pareto", multi_objective=True,
                                  show_progress=False),
        )
    assert result.storage == url and result.evaluations == 12
    study = optuna.load_study(study_name="pareto", storage=url)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    front = result.pareto_front
    assert len(front) >= 2 and all(r.result.ok for r in front)
    assert [r.share for r in front] == sorted(r.share for r in front)
    # The same front as Optuna's own (feasibility-constrained) one, which the dashboard draws.
    assert {(round(r.result.loss, 12), round(r.share, 12)) for r in front} == {
        (round(t.values[0], 12), round(t.values[1], 12)) for t in study.best_trials
    }
    # The exported config is the front's end with the most quantized compute.
    assert result.final_plan == front[-1].plan and result.quantized_share == pytest.approx(front[-1].share)
    assert "Pareto front" in result.summary()
    written = {p.name for p in write_report(study, tmp_path / "report")}
    assert "pareto_front.png" in written
