"""Issue 8 §3: SIGKILL a search at many points; re-running resumes to the uninterrupted outputs.

Each run is ``crash_job.py`` in a subprocess.  Seven kills land at fixed points
(during the float evaluation, during both calibration() calls, during
evaluations of the search, between the two ONNX files of the export, before
the final config), three after a seeded random delay.  A short heartbeat lets
a re-run fail a killed run's RUNNING trial after 2 s instead of 20 s.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from reliability_kit import check_files_sound, tiny_model, write_config

import amct_opt._io as amct_io

JOB = Path(__file__).with_name("crash_job.py")
#: Starts an atomic write of argv[1] with amct_opt's own _io module (loaded alone: no torch import)
#: and sleeps in the middle of it.
WRITER = (
    "import importlib.util, sys, time\n"
    f"spec = importlib.util.spec_from_file_location('amct_io', {amct_io.__file__!r})\n"
    "io = importlib.util.module_from_spec(spec); spec.loader.exec_module(io)\n"
    "writing = io.atomic_open(sys.argv[1], 'w'); handle = writing.__enter__()\n"
    "handle.write('{\"half'); handle.flush(); print('writing', flush=True); time.sleep(600)\n"
)
#: (event, n): pause at the n-th such event of the run, then kill it.  Each run gets further
#: than the one before, because everything the killed runs completed is reused.
FIXED_POINTS = [
    "evaluate:1",  # the float evaluation
    "calibration:1",  # calibration statistics (the float metric is stored)
    "calibration:2",  # the sensitivity pass (statistics and the all-INT8 trial are stored)
    "evaluate:1",  # the first BinarySearch step (the ranking is stored)
    "evaluate:2",  # the killed step is retried once its heartbeat is stale, then the next one
    "save:1",  # the fake-quant ONNX is written, the deploy ONNX is not
    "final_config:1",  # both ONNX files are written, the final config is not
]
RANDOM_KILLS = 3
#: Export is deterministic, so the ONNX files compare byte for byte too.
OUTPUTS = [
    "out/net_deploy_model.onnx",
    "out/net_fake_quant_model.onnx",
    "out/accuracy_based_auto_calibration_final_config.json",
    "out/accuracy_based_auto_calibration_ranking_information.json",
    "out/net_quant.json",
    "record.txt",
]


def environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AMCT_TEST_")}
    # PYTHONFAULTHANDLER: a run aborted after a time-out prints every thread's stack.
    env.update(AMCT_OPT_HEARTBEAT_S="1", AMCT_OPT_GRACE_S="2", PYTHONFAULTHANDLER="1", **extra)
    return env


def start(folder: Path, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(JOB), str(folder)], env=environment(**extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def stuck(proc: subprocess.Popen[str], what: str) -> TimeoutError:
    """Abort a run that is stuck (its stacks go to stderr) and say what it printed."""
    proc.send_signal(signal.SIGABRT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return TimeoutError(f"{what}; the run's stderr ends with:\n{(err or '')[-6000:]}")


def finish(folder: Path, proc: subprocess.Popen[str] | None = None, timeout: float = 240) -> dict[str, Any]:
    """Run (or wait for ``proc``, already started on ``folder``) to the end; its result."""
    proc = proc or start(folder)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise stuck(proc, f"the run on {folder} did not finish within {timeout} s") from None
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> bool:
    """True once ``path`` exists; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return path.exists()
        time.sleep(0.02)
    raise stuck(proc, f"{path} did not appear within {timeout} s")


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def writer(target: Path) -> subprocess.Popen[str]:
    """A process in the middle of an atomic write of ``target``."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    return proc


def temps(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


def test_only_the_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "final_config.json"
    target.write_text('{"complete": true}')
    dead, alive = writer(target), writer(target)
    try:
        kill(dead)
        assert len(temps(target)) == 2
        removed = amct_io.remove_stale_temps(target)
        assert len(removed) == 1 and str(dead.pid) in removed[0].name
        assert len(temps(target)) == 1 and str(alive.pid) in temps(target)[0].name
        assert json.loads(target.read_text()) == {"complete": True}  # never half-written
    finally:
        kill(alive)
    amct_io.remove_stale_temps(target)
    assert temps(target) == []


def test_atomic_writes_get_the_mode_open_would_give(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "deploy.onnx"
    amct_io.atomic_write_bytes(target, b"model")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0o600


def new_folder(root: Path) -> Path:
    root.mkdir()
    write_config(root / "quant.json", tiny_model())
    return root


def history(folder: Path) -> list[dict[str, Any]]:
    """The roll-back history without trial numbers (killed trials use numbers up)."""
    steps = json.loads((folder / "amct_log" / "accuracy_based_auto_calibration_record.json").read_text())
    return [{k: v for k, v in step.items() if k != "trial"} for step in steps]


def sound_except_temps(folder: Path) -> list[str]:
    return [p for p in check_files_sound(folder) if not p.startswith("temp file left")]


@pytest.mark.slow
def test_sigkill_at_many_points_then_resume(tmp_path: Path) -> None:
    reference = new_folder(tmp_path / "reference")
    uninterrupted = start(reference)  # runs beside the first kills

    chain = new_folder(tmp_path / "chain")
    kills = 0
    for point in FIXED_POINTS:
        proc = start(chain, AMCT_TEST_PAUSE=point)
        assert wait_for(chain / "paused", proc), f"the run finished before reaching {point}"
        kill(proc)
        kills += 1
        (chain / "paused").unlink()
        assert sound_except_temps(chain) == [], point
    rng = random.Random(20240601)
    for _ in range(3 * RANDOM_KILLS):  # a run may finish before its delay: try again, up to a limit
        if kills >= len(FIXED_POINTS) + RANDOM_KILLS:
            break
        proc = start(chain, AMCT_TEST_READY="1")
        wait_for(chain / "ready", proc)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            kill(proc)
            kills += 1
        else:
            assert proc.wait() == 0, proc.communicate()[1][-3000:]
        (chain / "ready").unlink(missing_ok=True)
        assert sound_except_temps(chain) == []
    assert kills >= 10
    # A run killed in the middle of writing an output leaves its temporary file: the next run removes it.
    final_config = chain / "out" / "accuracy_based_auto_calibration_final_config.json"
    kill(writer(final_config))
    assert temps(final_config)

    result, expected = finish(chain), finish(reference, uninterrupted)
    assert result["final_plan"] == expected["final_plan"]
    assert result["evaluations"] == expected["evaluations"]
    for name in OUTPUTS:
        assert (chain / name).read_bytes() == (reference / name).read_bytes(), name
    assert history(chain) == history(reference)
    assert check_files_sound(chain) == []  # no leftover temporary files either


@pytest.mark.slow
def test_a_run_killed_before_its_first_heartbeat_does_not_stall_the_rerun(tmp_path: Path) -> None:
    """SIGKILL between ``study.ask()`` and the trial's first heartbeat leaves a RUNNING trial with no
    heartbeat row, which Optuna never finds stale (CI once stalled on one for over 120 s)."""
    reference = new_folder(tmp_path / "reference")
    expected = finish(reference)
    chain = new_folder(tmp_path / "chain")
    proc = start(chain, AMCT_TEST_PAUSE="calibration:2")  # the all-INT8 trial is stored, the ranking is not
    assert wait_for(chain / "paused", proc)
    kill(proc)
    (chain / "paused").unlink()
    # What the killed run would have left: the first BinarySearch step popped from the queue, no heartbeat.
    first_step = optuna.load_study(study_name="net", storage=f"sqlite:///{reference}/out/amct_opt.db").trials[1]
    study = optuna.load_study(study_name="net", storage=f"sqlite:///{chain}/out/amct_opt.db")
    study.enqueue_trial(first_step.params, user_attrs={"source": first_step.user_attrs["source"]})
    orphan = study.ask()
    assert study.trials[orphan.number].state is TrialState.RUNNING

    result = finish(chain, timeout=90)
    assert result["final_plan"] == expected["final_plan"]
    assert result["evaluations"] == expected["evaluations"]
    study = optuna.load_study(study_name="net", storage=f"sqlite:///{chain}/out/amct_opt.db")
    assert study.trials[orphan.number].state is TrialState.FAIL
    for name in OUTPUTS:
        assert (chain / name).read_bytes() == (reference / name).read_bytes(), name
