"""export_trial: any stored trial, later, from the study alone, byte for byte the run's export."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from conftest import Trained
from search_run import SearchedRun, searched_run

from amct_opt.errors import InputError
from amct_opt.trial_export import export_trial
from amct_opt.trials import INT8


@pytest.fixture()
def run(tmp_path_factory: pytest.TempPathFactory, trained: Trained) -> SearchedRun:
    return searched_run(tmp_path_factory, trained)


def final_trial(run: SearchedRun) -> optuna.trial.FrozenTrial:
    study = optuna.load_study(study_name=run.study_name, storage=run.storage)
    return next(
        t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if "cached_from" not in t.user_attrs and {n: v == INT8 for n, v in t.params.items()} == run.result.final_plan
    )


def test_reproduces_the_runs_final_export_byte_for_byte(run: SearchedRun, tmp_path: Path) -> None:
    trial = final_trial(run)
    out = export_trial(run.model, run.study_name, run.storage, trial.number, tmp_path / "again" / "small",
                       run.input_data, run.config_file)
    assert out.plan == run.result.final_plan
    paths = run.result.paths
    assert out.deploy_model.read_bytes() == Path(paths["deploy_model"]).read_bytes()
    assert out.fake_quant_model.read_bytes() == Path(paths["fake_quant_model"]).read_bytes()
    for mine, theirs in ((out.final_config, paths["final_config"]), (out.fusion_info, paths["fusion_info"])):
        assert json.loads(mine.read_text()) == json.loads(Path(theirs).read_text())


def test_exports_another_trial_with_its_own_plan(run: SearchedRun, tmp_path: Path) -> None:
    study = optuna.load_study(study_name=run.study_name, storage=run.storage)
    other = next(
        t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if INT8 in t.params.values() and {n: v == INT8 for n, v in t.params.items()} != run.result.final_plan
    )
    out = export_trial(run.model, run.study_name, run.storage, other.number, tmp_path / "other",
                       run.input_data, run.config_file)
    config = json.loads(out.final_config.read_text())
    assert {name: config[name]["quant_enable"] for name in out.plan} == {
        name: value == INT8 for name, value in other.params.items()
    }
    assert out.deploy_model.read_bytes() != Path(run.result.paths["deploy_model"]).read_bytes()


def test_refuses_a_trial_number_the_study_does_not_have(run: SearchedRun, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"trial_number: study 'small' has no trial 999 \(its trials are numbered 0"):
        export_trial(run.model, run.study_name, run.storage, 999, tmp_path / "m", run.input_data, run.config_file)
    assert not list(tmp_path.iterdir())


def test_refuses_a_trial_that_is_not_complete(run: SearchedRun, tmp_path: Path) -> None:
    shutil.copy(run.folder / "amct_opt.db", tmp_path / "copy.db")
    storage = f"sqlite:///{(tmp_path / 'copy.db').as_posix()}"
    study = optuna.load_study(study_name=run.study_name, storage=storage)
    study.enqueue_trial(final_trial(run).params)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0].number
    with pytest.raises(InputError, match=f"trial_number: trial {waiting} of study 'small' is WAITING, not COMPLETE"):
        export_trial(run.model, run.study_name, storage, waiting, tmp_path / "m", run.input_data, run.config_file)


def test_refuses_a_model_other_than_the_studys(run: SearchedRun, tmp_path: Path) -> None:
    other = copy.deepcopy(run.model)
    with torch.no_grad():
        other.fc2.bias.add_(0.01)
    with pytest.raises(InputError, match="model: the model weights differ from those of study 'small'"):
        export_trial(other, run.study_name, run.storage, final_trial(run).number, tmp_path / "m",
                     run.input_data, run.config_file)
    assert not (tmp_path / "m_deploy_model.onnx").exists()


def test_refuses_an_unknown_study(run: SearchedRun, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"study_name: no study 'nope' in sqlite:.*it holds \['small'\]"):
        export_trial(run.model, "nope", run.storage, 0, tmp_path / "m", run.input_data, run.config_file)
