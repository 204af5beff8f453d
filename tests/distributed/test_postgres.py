"""Issue 6: several worker processes, one study, on the real PostgreSQL server.

Also MariaDB, through ``amct-opt worker``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from distributed_kit import (  # noqa: F401 - mariadb_url, postgres_url and study_names are fixtures
    FAST_HEARTBEAT,
    calls,
    mariadb_url,
    new_study,
    postgres_url,
    start_worker,
    study_names,
)
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from amct_opt.distributed import WORKER_ATTR

pytestmark = [pytest.mark.slow]

PASSWORD = "S3cr3t-pw-4711"


def _with_password(url: str) -> str:
    """The same server, with a password in the URL (trust authentication ignores it)."""
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def _evaluated(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t for t in study.get_trials(states=(TrialState.COMPLETE,))
        if "metric" in t.user_attrs and "cached_from" not in t.user_attrs
    ]


def _quantized(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials whose evaluation called evaluate(): the all-float config is answered by the float metric."""
    return [t for t in trials if "int8" in t.params.values()]


def _wait_for(folder: Path, kind: str, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [c for c in calls(folder) if c[0] == kind]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {kind!r} call within {timeout} s")


def _texts(folder: Path) -> str:
    """Every readable text under ``folder`` (logs, JSON, records, models as latin-1)."""
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


@pytest.mark.postgres
def test_three_workers_share_one_study_like_one_process(
    postgres_url: str, study_names: list[tuple[str, str]], tmp_path: Path
) -> None:
    """The global budget spent exactly, no config twice, one float evaluation and one calibration,
    the single-process run's best, the same model exported by every worker, and no password anywhere."""
    url = _with_password(postgres_url)
    shared = new_study(study_names, postgres_url, "three")
    single = new_study(study_names, postgres_url, "single")
    budget = 12
    settings = {"storage": url, "n_trials": budget, "landscape": "on_path", "cost_s": 0.2, "calibration_s": 3.0}
    alone = start_worker({**settings, "folder": str(tmp_path / "single"), "study": single})
    workers = [
        start_worker({**settings, "folder": str(tmp_path / "shared"), "study": shared, "name": f"w{i}"})
        for i in range(3)
    ]
    results = [w.finish() for w in workers]
    single_result, _ = alone.finish()

    study = optuna.load_study(study_name=shared, storage=postgres_url)
    log = calls(tmp_path / "shared")
    plans = [c[2] for c in log if c[0] == "evaluate"]
    evaluated = _evaluated(study)
    assert len(evaluated) == budget
    assert len(plans) == len(set(plans)) == len(_quantized(evaluated)), f"twice: {Counter(plans).most_common(2)}"
    assert sum(r["evaluations_this_run"] for r, _ in results) == budget
    assert [c[0] for c in log].count("float") == 1
    calibrators = {c[1] for c in log if c[0] == "calibration"}
    assert [c[0] for c in log].count("calibration") == 2 and len(calibrators) == 1  # calibration + ranking
    assert sorted(r["calibration_calls"] for r, _ in results) == [0, 0, 2]
    assert any("waiting for worker" in err for _, err in results)

    assert {str(r["final_plan"]) for r, _ in results} == {str(single_result["final_plan"])}
    assert {r["final_metric"] for r, _ in results} == {single_result["final_metric"]}
    models = {(Path(r["work"]) / "out" / "chain_deploy_model.onnx").read_bytes() for r, _ in results}
    assert len(models) == 1, "the workers exported different final models"
    assert not [k for k in study.user_attrs if k.startswith("lease:")], "a worker left a lease behind"

    everything = _texts(tmp_path) + "".join(err + str(r) for r, err in results) + str(study.user_attrs)
    everything += "".join(str(t.user_attrs) + str(t.system_attrs) for t in study.trials)
    assert PASSWORD not in everything
    assert all("***" in r["storage"] for r, _ in results)


@pytest.mark.postgres
def test_a_killed_workers_trial_fails_and_another_worker_retries_it(
    postgres_url: str, study_names: list[tuple[str, str]], tmp_path: Path
) -> None:
    name = new_study(study_names, postgres_url, "killed")
    settings = {"storage": postgres_url, "study": name, "n_trials": 6, "folder": str(tmp_path)}
    doomed = start_worker({**settings, "hang": "evaluate:2"}, env=FAST_HEARTBEAT)
    hung = _wait_for(tmp_path, "hang")
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()
    result, _ = start_worker(settings, env=FAST_HEARTBEAT).finish()

    study = optuna.load_study(study_name=name, storage=postgres_url)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs[WORKER_ATTR].endswith(f":{hung[1]}")
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert [t.state for t in retries] == [TrialState.COMPLETE]
    assert retries[0].user_attrs[WORKER_ATTR].endswith(f":{result['pid']}")
    plans = [c[2] for c in calls(tmp_path) if c[0] == "evaluate"]
    assert plans.count(hung[2]) == 1 and len(set(plans)) == len(plans)
    assert result["evaluations"] == 6


@pytest.mark.postgres
def test_a_worker_takes_over_the_calibration_of_a_killed_one(
    postgres_url: str, study_names: list[tuple[str, str]], tmp_path: Path
) -> None:
    name = new_study(study_names, postgres_url, "takeover")
    settings = {"storage": postgres_url, "study": name, "n_trials": 4, "folder": str(tmp_path)}
    doomed = start_worker({**settings, "hang": "calibration"}, env=FAST_HEARTBEAT)
    _wait_for(tmp_path, "hang")
    heir = start_worker(settings, env=FAST_HEARTBEAT)
    time.sleep(1.0)
    os.kill(doomed.process.pid, signal.SIGKILL)
    doomed.process.wait()
    result, err = heir.finish()
    assert result["calibration_calls"] == 2
    assert "took over lease:setup" in err
    assert [c[0] for c in calls(tmp_path)].count("float") == 1  # the float metric was published before the hang
    assert result["evaluations"] == 4


def test_amct_opt_worker_runs_two_processes_on_mariadb(
    mariadb_url: str, study_names: list[tuple[str, str]], tmp_path: Path
) -> None:
    name = new_study(study_names, mariadb_url, "mariadb")
    job = f"{Path(__file__).with_name('distributed_job.py')}:cli_job"
    env = {**os.environ, "AMCT_OPT_STORAGE": mariadb_url,
           "DISTRIBUTED_JOB": json.dumps({"folder": str(tmp_path), "cost_s": 0.2})}
    done = subprocess.run(
        [sys.executable, "-m", "amct_opt.cli", "worker", job, "--study", name, "--n-trials", "5", "--processes", "2"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("evaluations         : 5 in the study") == 2
    plans = [c[2] for c in calls(tmp_path) if c[0] == "evaluate"]
    evaluated = _evaluated(optuna.load_study(study_name=name, storage=mariadb_url))
    assert len(evaluated) == 5 and len(plans) == len(set(plans)) == len(_quantized(evaluated))
    assert [c[0] for c in calls(tmp_path)].count("calibration") == 2
