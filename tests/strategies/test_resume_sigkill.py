"""A search killed with SIGKILL in the middle of an evaluation resumes without losing or repeating work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import Trained
from search_run import searched_run, small_data

import amct_opt as amct

WORKER = Path(__file__).resolve().parent / "resume_worker.py"


def calls(folder: Path) -> list[list[str]]:
    path = folder / "calls.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def complete_trials(storage: str) -> dict[int, optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name="resume", storage=storage)
    except KeyError:
        return {}
    return {t.number: t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}


@pytest.mark.slow
def test_resume_after_sigkill_mid_evaluation(tmp_path_factory: pytest.TempPathFactory, trained: Trained,
                                             tmp_path: Path) -> None:
    run = searched_run(tmp_path_factory, trained)
    data = small_data(trained)
    torch.save({"weights": trained.model.state_dict(), "train_x": data.train_x[:256], "train_y": data.train_y[:256],
                "test_x": data.test_x, "test_y": data.test_y, "target": torch.tensor(0.6 * run.target)},
               tmp_path / "setup.pt")
    amct.create_quant_config(str(tmp_path / "config.json"), trained.model, data.train_x[:1], batch_num=2)
    storage = f"sqlite:///{(tmp_path / 'study.db').as_posix()}"
    env = {**os.environ, "AMCT_OPT_HEARTBEAT_S": "1", "AMCT_OPT_GRACE_S": "2", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(WORKER), str(tmp_path)]

    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    killed_at: dict[int, optuna.trial.FrozenTrial] = {}
    while time.monotonic() < deadline and first.poll() is None:
        lines = calls(tmp_path)
        if lines and lines[-1][0] == "start" and lines[-1][2] != "float":
            done = complete_trials(storage)
            if len(done) >= 2 and calls(tmp_path)[-1] == lines[-1]:
                os.kill(first.pid, signal.SIGKILL)
                killed_at = done
                break
        time.sleep(0.1)
    first.wait(timeout=30)
    assert killed_at, "the first worker ended before it could be killed mid-evaluation:\n" + (
        first.stdout.read().decode() if first.stdout else "")
    assert first.returncode == -signal.SIGKILL
    study = optuna.load_study(study_name="resume", storage=storage)
    interrupted = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
    assert len(interrupted) == 1

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["reachable"] and Path(summary["deploy"]).is_file()

    final = complete_trials(storage)
    for number, trial in killed_at.items():  # no completed trial lost
        assert final[number].params == trial.params and final[number].values == trial.values
    states = {t.number: t.state for t in optuna.load_study(study_name="resume", storage=storage).trials}
    assert states[interrupted[0]] == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states.values()

    log = calls(tmp_path)
    pids = list(dict.fromkeys(line[1] for line in log))
    assert len(pids) == 2
    finished = [line[2] for line in log if line[0] == "end"]
    assert len(finished) == len(set(finished)), "a config was evaluated to the end twice"
    assert [line[1] for line in log if line[0] == "calibration"] == [pids[0], pids[0]]  # none in the 2nd run
    assert [line for line in log if line[0] == "start" and line[2] == "float" and line[1] == pids[1]] == []
    evaluated = [t for t in final.values() if "cached_from" not in t.user_attrs]
    assert summary["evaluations"] == len(evaluated)
