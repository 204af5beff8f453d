"""Issue 8 §4: two processes search one SQLite study (the default storage) at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from reliability_kit import check_files_sound, tiny_model, write_config

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("crash_job.py")


@pytest.mark.parametrize(("strategy", "budget"), [("optuna", 10), ("binary", None)])
def test_two_processes_share_one_sqlite_study(tmp_path: Path, strategy: str, budget: int | None) -> None:
    write_config(tmp_path / "quant.json", tiny_model())
    args = [sys.executable, str(JOB), str(tmp_path)] + (["--strategy", "optuna"] if strategy == "optuna" else [])
    env = {key: value for key, value in os.environ.items() if not key.startswith("AMCT_TEST_")}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    study = optuna.load_study(study_name="net", storage=f"sqlite:///{tmp_path / 'out' / 'amct_opt.db'}")
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)]
    evaluated = [t for t in trials if t.state == TrialState.COMPLETE and "cached_from" not in t.user_attrs]
    plans = [tuple(sorted(t.params.items())) for t in evaluated]
    assert len(plans) == len(set(plans)), "a config was evaluated twice"
    # Every evaluation is stored, by exactly one of the two processes, and both see all of them.
    assert sum(r["evaluations_this_run"] for r in results) == len(evaluated)
    assert [r["evaluations"] for r in results] == [len(evaluated)] * 2
    if budget is not None:
        assert len(evaluated) <= budget  # OptunaSearch may stop early: once the optimum is proven
    assert results[0]["final_plan"] == results[1]["final_plan"]
    assert check_files_sound(tmp_path) == []
