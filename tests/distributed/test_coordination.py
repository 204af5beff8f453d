"""Leases, the once-per-study setup stages and the budget claim, on a SQLite study file (fast)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.storages._rdb.models import TrialHeartbeatModel
from optuna.trial import TrialState

from amct_opt.distributed import MIN_POLL_S, SETUP_LEASE, WORKER_ATTR, Coordinator, fail_stale_trials, poll_delay
from amct_opt.errors import StorageError
from amct_opt.storage import heartbeat_settings, mask_url, open_storage
from amct_opt.trials import SearchStudy
from amct_opt.types import EvalResult, LayerCost


@pytest.fixture
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> optuna.Study:
    monkeypatch.setenv("AMCT_OPT_HEARTBEAT_S", "1")
    monkeypatch.setenv("AMCT_OPT_GRACE_S", "2")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    return optuna.create_study(storage=storage, study_name="coordination", direction="maximize")


def test_a_lease_has_one_holder_until_released(study: optuna.Study) -> None:
    first, second = Coordinator(study), Coordinator(study)
    assert first.try_acquire(SETUP_LEASE)
    assert not second.try_acquire(SETUP_LEASE)
    assert second.holder(SETUP_LEASE) == first.name
    first.close()
    assert second.holder(SETUP_LEASE) is None
    assert second.try_acquire(SETUP_LEASE)
    second.close()
    assert not [key for key in study.user_attrs if key.startswith("lease:")]


def test_the_heartbeat_keeps_a_lease_and_a_silent_holder_loses_it(study: optuna.Study) -> None:
    alive, dead, heir = Coordinator(study), Coordinator(study), Coordinator(study)
    assert alive.try_acquire("lease:alive") and dead.try_acquire("lease:dead", keep_alive=False)
    time.sleep(3.2)  # past the 2 s grace period; only "alive" was renewed
    assert not heir.try_acquire("lease:alive")
    assert heir.try_acquire("lease:dead")
    assert heir.holder("lease:dead") == heir.name
    alive.close()
    heir.close()


def test_once_computes_in_one_worker_and_the_others_reuse_it(study: optuna.Study) -> None:
    computed: list[str] = []
    results: dict[str, tuple[str, bool]] = {}

    def worker(name: str) -> None:
        coordinator = Coordinator(study)

        def compute() -> str:
            computed.append(name)
            time.sleep(0.5)
            study.set_user_attr("published", f"value from {name}")
            return f"value from {name}"

        results[name] = coordinator.once("value", lambda: study.user_attrs.get("published"), compute)
        coordinator.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(computed) == 1
    assert {value for value, _ in results.values()} == {f"value from {computed[0]}"}
    assert sorted(flag for _, flag in results.values()) == [False, False, True]


def test_a_waiter_looks_again_after_a_tenth_of_its_wait_within_bounds() -> None:
    """So an awaited result is seen about 10% late at most (doubling pauses saw a 1.2 s evaluation 0.24 s late)."""
    assert poll_delay(0.0, 0.5) == MIN_POLL_S
    assert poll_delay(1.2, 0.5) == pytest.approx(0.12)
    assert poll_delay(3.0, 0.5) == pytest.approx(0.3)
    assert poll_delay(600.0, 0.5) == 0.5
    waited, looks = 0.0, 0
    while waited < 1.2:  # an evaluation of 1.2 s, awaited from its start
        waited += poll_delay(waited, 0.5)
        looks += 1
    assert waited - 1.2 <= 0.1 * 1.2 + 1e-9 and looks < 30


def test_once_takes_over_from_a_holder_that_stopped_beating(study: optuna.Study) -> None:
    Coordinator(study).try_acquire(SETUP_LEASE, keep_alive=False)  # a worker that died holding it
    started = time.monotonic()
    value, computed = Coordinator(study).once("value", lambda: None, lambda: "mine")
    assert (value, computed) == ("mine", True)
    assert 1.5 < time.monotonic() - started < 6


def _running(study: optuna.Study, params: dict[str, str]) -> optuna.Trial:
    """A RUNNING trial holding ``params``, as a worker's objective sees it."""
    study.enqueue_trial(params)
    trial = study.ask()
    for name in params:
        trial.suggest_categorical(name, ("int8", "float"))
    return trial


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_claim_refuses_a_running_duplicate_and_the_spent_budget(study: optuna.Study) -> None:
    store = SearchStudy(study, ["a", "b"], {"a": LayerCost(1, 1), "b": LayerCost(1, 1)})
    coordinator = Coordinator(study)
    first = _running(study, {"a": "int8", "b": "float"})
    twin = _running(study, {"a": "int8", "b": "float"})
    other = _running(study, {"a": "int8", "b": "int8"})
    assert coordinator.claim(store, first, {"a": True, "b": False}, budget=2) is None
    assert first.user_attrs[WORKER_ATTR] == coordinator.name
    refused = coordinator.claim(store, twin, {"a": True, "b": False}, budget=2)
    assert refused == "the same config is being evaluated by another worker"
    assert WORKER_ATTR not in twin.user_attrs
    assert coordinator.claim(store, other, {"a": True, "b": True}, budget=1) == "budget"
    assert coordinator.claim(store, other, {"a": True, "b": True}, budget=2) is None
    coordinator.close()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_claim_refuses_when_the_stored_evaluations_settle_the_search(study: optuna.Study) -> None:
    store = SearchStudy(study, ["a", "b"], {"a": LayerCost(1, 1), "b": LayerCost(1, 1)})
    coordinator = Coordinator(study)
    seen: list[list[tuple[bool, ...]]] = []

    def finished(records: list) -> str | None:
        seen.append([store.key(r.plan) for r in records])
        return "settled" if records else None

    first = _running(study, {"a": "int8", "b": "float"})
    assert coordinator.claim(store, first, {"a": True, "b": False}, budget=None, finished=finished) is None
    for key, value in store.attrs_for({"a": True, "b": False}, EvalResult(1.0, True, 0.0)).items():
        first.set_user_attr(key, value)
    study.tell(first, 0.5)
    second = _running(study, {"a": "int8", "b": "int8"})
    assert coordinator.claim(store, second, {"a": True, "b": True}, budget=None, finished=finished) == "settled"
    assert seen == [[], [(True, False)]]  # it is shown every stored evaluation, under the lock
    assert WORKER_ATTR not in second.user_attrs
    coordinator.close()


def _heartbeat_rows(study: optuna.Study) -> set[int]:
    """Trial ids that have a row in Optuna's heartbeat table."""
    storage = study._storage._backend  # type: ignore[attr-defined]
    with storage.engine.connect() as conn:
        return set(conn.execute(sa.select(TrialHeartbeatModel.__table__.c.trial_id)).scalars())


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_claim_writes_the_first_heartbeat_before_the_evaluation(study: optuna.Study) -> None:
    """A worker killed in evaluate() must leave a trial whose heartbeat goes stale, whatever Optuna's thread did."""
    store = SearchStudy(study, ["a", "b"], {"a": LayerCost(1, 1), "b": LayerCost(1, 1)})
    coordinator = Coordinator(study)
    trial = _running(study, {"a": "int8", "b": "float"})
    assert trial._trial_id not in _heartbeat_rows(study)
    assert coordinator.claim(store, trial, {"a": True, "b": False}, budget=None) is None
    assert trial._trial_id in _heartbeat_rows(study)
    coordinator.close()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_that_never_sent_a_heartbeat_is_failed_after_the_grace_period_and_retried(
    study: optuna.Study,
) -> None:
    """Killed between ask() and the first heartbeat: Optuna alone would leave it RUNNING forever."""
    silent = _running(study, {"a": "int8", "b": "float"})  # ask() set it RUNNING; no heartbeat row
    beating = _running(study, {"a": "float", "b": "int8"})
    storage = study._storage._backend  # type: ignore[attr-defined]
    started = time.monotonic()
    while study._storage.get_trial(silent._trial_id).state is TrialState.RUNNING:
        assert time.monotonic() - started < 8, "the silent trial was never failed"
        storage.record_heartbeat(beating._trial_id)  # a live worker
        fail_stale_trials(study)
        time.sleep(0.2)
    assert 2 <= time.monotonic() - started  # not before the 2 s grace period
    assert study._storage.get_trial(beating._trial_id).state is TrialState.RUNNING
    assert study._storage.get_trial(silent._trial_id).state is TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == silent.number]
    assert [t.state for t in retried] == [TrialState.WAITING]
    assert retried[0].system_attrs["fixed_params"] == {"a": "int8", "b": "float"}


def test_a_storage_without_a_database_grants_every_lease() -> None:
    study = optuna.create_study()
    first, second = Coordinator(study), Coordinator(study)
    assert first.try_acquire(SETUP_LEASE) and second.try_acquire(SETUP_LEASE)
    with first.locked():
        pass
    assert first.once("value", lambda: None, lambda: 3) == (3, True)


@pytest.mark.parametrize(
    ("heartbeat", "grace", "message"),
    [("0", None, "AMCT_OPT_HEARTBEAT_S"), ("x", None, "AMCT_OPT_HEARTBEAT_S"), ("5", "5", "grace period")],
)
def test_heartbeat_settings_reject_bad_environment_values(
    monkeypatch: pytest.MonkeyPatch, heartbeat: str, grace: str | None, message: str
) -> None:
    monkeypatch.setenv("AMCT_OPT_HEARTBEAT_S", heartbeat)
    if grace is None:
        monkeypatch.delenv("AMCT_OPT_GRACE_S", raising=False)
    else:
        monkeypatch.setenv("AMCT_OPT_GRACE_S", grace)
    with pytest.raises(StorageError, match=message):
        heartbeat_settings()


def test_heartbeat_settings_default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMCT_OPT_HEARTBEAT_S", raising=False)
    monkeypatch.delenv("AMCT_OPT_GRACE_S", raising=False)
    assert heartbeat_settings() == (5, 20)
    monkeypatch.setenv("AMCT_OPT_HEARTBEAT_S", "2")
    monkeypatch.setenv("AMCT_OPT_GRACE_S", "7")
    assert heartbeat_settings() == (2, 7)


@pytest.mark.parametrize("text", ["postgresql+psycopg:/user:S3cret@host/db", "bogus:user:S3cret@host"])
def test_mask_url_hides_the_password_of_text_that_is_not_a_url(text: str) -> None:
    assert "S3cret" not in mask_url(text)
    with pytest.raises(StorageError) as caught:
        open_storage(text)
    assert "S3cret" not in str(caught.value)


def test_amct_opt_worker_needs_a_storage_and_a_loadable_job(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from amct_opt.cli import main

    monkeypatch.delenv("AMCT_OPT_STORAGE", raising=False)
    assert main(["worker", "json:loads"]) == 2
    assert "AMCT_OPT_STORAGE" in capsys.readouterr().err
    assert main(["worker", "no_such_module:build", "--storage", "sqlite:///x.db"]) == 2
    assert "cannot load 'no_such_module:build'" in capsys.readouterr().err
    assert main(["worker", "json", "--storage", "sqlite:///x.db"]) == 2
    assert "expected 'module:function'" in capsys.readouterr().err


def test_a_run_for_another_model_may_not_take_over_a_study_with_live_workers(study: optuna.Study) -> None:
    from amct_opt.auto_calibration_setup import _check_fingerprint

    searching, newcomer = Coordinator(study), Coordinator(study)
    parts = {"model weights": "first"}
    fingerprint = _check_fingerprint(study, parts, searching)
    assert searching.join() == 0
    assert newcomer.live_workers() == [searching.name] and searching.live_workers() == []
    assert _check_fingerprint(study, parts, newcomer) == fingerprint
    with pytest.raises(StorageError, match="is being searched by worker"):
        _check_fingerprint(study, {"model weights": "second"}, newcomer)
    assert study.user_attrs["fingerprint"] == fingerprint
    searching.close()
    assert _check_fingerprint(study, {"model weights": "second"}, newcomer) != fingerprint
