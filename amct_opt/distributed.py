"""Many workers, one study: race-free coordination through the study's RDB storage.

Every process that runs the same ``accuracy_based_auto_calibration`` call
against one study (PostgreSQL or MySQL/MariaDB for several machines, SQLite
for one) is a *worker*.  Optuna's RDB storage already shares the trials and
fails and retries a crashed worker's trial by heartbeat; this module adds:

* :func:`fail_stale_trials`: Optuna's check, plus the RUNNING trials that never
  got a heartbeat (a worker killed between ``ask()`` and its first beat), which
  Optuna would leave RUNNING forever.  :meth:`Coordinator.claim` makes sure a
  trial has its first heartbeat before the evaluation starts.

* **leases**: a row of Optuna's ``study_user_attributes`` table, whose
  ``UNIQUE(study_id, key)`` constraint makes "insert if absent" an atomic
  election on every backend.  The holder renews the row's heartbeat (the
  database's clock, as Optuna's trial heartbeats) from a background thread; a
  lease whose heartbeat is older than the grace period is taken over by a
  compare-and-swap ``UPDATE``, so a worker that dies while holding one is
  replaced.
* :meth:`Coordinator.once`: under the ``lease:setup`` lease one worker
  evaluates the float model, calibrates and ranks, publishing each in the
  study; the others wait for it and reuse it.
* :meth:`Coordinator.claim`: under a short mutex (PostgreSQL's advisory lock,
  MySQL's ``GET_LOCK``, the ``lease:budget`` lease on SQLite) a trial checks
  the global budget and running duplicates, then marks itself as evaluating
  (user attribute ``worker``): ``n_trials`` is never overshot and no config is
  evaluated twice.
* worker slots ``lease:worker.<k>``: a live worker holds the lowest free
  ``k``; every worker but ``0`` reseeds its sampler, so that workers given the
  same ``seed`` do not propose the same configs.

Other storages (in-memory, journal) run one worker: every lease is granted.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.storages._rdb.models import StudyUserAttributeModel, TrialHeartbeatModel, TrialModel
from optuna.trial import FrozenTrial, TrialState

from .storage import heartbeat_settings
from .trials import SearchStudy, TrialRecord
from .types import Plan

__all__ = [
    "BUDGET_LEASE",
    "Coordinator",
    "SETUP_LEASE",
    "WORKER_ATTR",
    "fail_stale_trials",
    "in_flight",
    "poll_delay",
    "worker_name",
]

logger = logging.getLogger("amct_opt")

T = TypeVar("T")

#: Held by the worker that evaluates the float model, calibrates and ranks.
SETUP_LEASE = "lease:setup"
#: The short mutex around a trial's budget and duplicate check (on SQLite; a server lock elsewhere).
BUDGET_LEASE = "lease:budget"
#: User attribute of a trial that evaluates (or evaluated) its config: the worker's name.
WORKER_ATTR = "worker"
#: Seconds between two looks at a lease held by another worker.
POLL_S = 0.25
#: Seconds between two "still waiting" log lines.
REMIND_S = 60.0
#: Shortest pause between two looks, and the share of the time waited so far that the next pause is.
MIN_POLL_S, POLL_SHARE = 0.02, 0.1


def poll_delay(waited_s: float, cap_s: float) -> float:
    """The pause before the next look, after ``waited_s`` seconds of waiting: a tenth of it, within bounds.

    What is awaited (another worker's evaluation, calibration or ranking) is
    seen at most about 10% late, while a long wait reads the study at most every ``cap_s``.
    """
    return min(cap_s, max(MIN_POLL_S, POLL_SHARE * waited_s))

_TABLE = StudyUserAttributeModel.__table__
#: First key of PostgreSQL's two-key advisory lock ("amct" in ASCII); the second is the study id.
_PG_LOCK_SPACE = 0x616D6374


def worker_name() -> str:
    """``host:pid``: how this process appears in logs and in the study."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _rdb(study: optuna.Study) -> RDBStorage | None:
    """The RDB storage under ``study`` (Optuna wraps it in a cache), or None."""
    storage = getattr(study, "_storage", None)
    storage = getattr(storage, "_backend", storage)
    return storage if isinstance(storage, RDBStorage) else None


#: ``(storage URL, trial id) -> time.monotonic()`` when this process first saw the RUNNING trial
#: with no heartbeat row (see :func:`_fail_trials_without_heartbeat`).
_HEARTBEATLESS: dict[tuple[str, int], float] = {}


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and re-queue) the RUNNING trials of workers whose heartbeat stopped, or never started."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    _fail_trials_without_heartbeat(study)


def _fail_trials_without_heartbeat(study: optuna.Study) -> None:
    """Fail (and re-queue) RUNNING trials that have had no heartbeat row for a whole grace period.

    Optuna's heartbeat check skips a RUNNING trial with no heartbeat row at all:
    that of a worker killed after ``study.ask()`` set the trial RUNNING but
    before its heartbeat thread's first write committed (a window of a few
    milliseconds, longer when SQLite's lock is busy).  Such a trial would hold
    its config, and a budget slot, forever.  Its age is measured on this
    process's own clock, from the first time it was seen without a heartbeat,
    so clock skew between machines does not matter.
    """
    storage = _rdb(study)
    if storage is None or storage.heartbeat_interval is None:
        return
    grace = storage.grace_period if storage.grace_period is not None else 2 * storage.heartbeat_interval
    url = str(storage.engine.url)
    trials, beats = TrialModel.__table__, TrialHeartbeatModel.__table__
    query = (
        sa.select(trials.c.trial_id)
        .select_from(trials.outerjoin(beats, beats.c.trial_id == trials.c.trial_id))
        .where(
            trials.c.study_id == study._study_id,
            trials.c.state == TrialState.RUNNING,
            beats.c.trial_id.is_(None),
        )
    )
    with storage.engine.connect() as conn:
        silent = set(conn.execute(query).scalars())
    now = time.monotonic()
    for key in [k for k in _HEARTBEATLESS if k[0] == url and k[1] not in silent]:
        del _HEARTBEATLESS[key]  # finished, or its heartbeat started
    stale = [tid for tid in sorted(silent) if now - _HEARTBEATLESS.setdefault((url, tid), now) > grace]
    failed = []
    for trial_id in stale:
        try:
            if study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first
        _HEARTBEATLESS.pop((url, trial_id), None)
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in failed:
        frozen = study._storage.get_trial(trial_id)
        logger.info("trial %d never sent a heartbeat for %d s (its worker died): failed", frozen.number, grace)
        if callback is not None:
            callback(study, copy.deepcopy(frozen))


def in_flight(
    study: SearchStudy, exclude: int | None = None, trials: Sequence[FrozenTrial] | None = None
) -> list[FrozenTrial]:
    """RUNNING trials that claimed an evaluation (a crashed worker's until its heartbeat is stale).

    ``trials``: the study's trials as just read (any states), to save another read.
    """
    if trials is None:
        trials = study.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [
        t
        for t in trials
        if t.state is TrialState.RUNNING and WORKER_ATTR in t.user_attrs and t.number != exclude
    ]


def _stored_and_running(study: SearchStudy, exclude: int | None = None) -> tuple[list[TrialRecord], list[FrozenTrial]]:
    """The stored evaluations and the claimed running trials, from one read of the study."""
    trials = study.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    return study.records(trials=trials), in_flight(study, exclude, trials)


def _first_heartbeat(study: optuna.Study, trial_id: int) -> None:
    """Make sure the trial has a heartbeat row before its evaluation starts.

    Optuna's heartbeat thread writes the first one concurrently with the
    objective; until it commits, a worker killed now would leave a RUNNING trial
    that no heartbeat check fails.  Wait for that row (up to one heartbeat
    interval: the thread normally needs milliseconds), then write it here.
    """
    storage = _rdb(study)
    if storage is None or storage.heartbeat_interval is None:
        return
    beats = TrialHeartbeatModel.__table__
    query = sa.select(beats.c.trial_id).where(beats.c.trial_id == trial_id)
    deadline = time.monotonic() + storage.heartbeat_interval
    while True:
        with storage.engine.connect() as conn:
            if conn.execute(query).first() is not None:
                return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    with contextlib.suppress(optuna.exceptions.StorageInternalError, sa.exc.SQLAlchemyError):
        storage.record_heartbeat(trial_id)  # (fails only if the thread inserted it at this moment)


class Coordinator:
    """The leases of one worker in one study.  Call :meth:`close` when the run ends."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.name = worker_name()
        self._owner = f"{self.name}/{uuid.uuid4().hex[:8]}"
        self._interval, self._grace = heartbeat_settings()
        storage = _rdb(study)
        self._engine: sa.Engine | None = None if storage is None else storage.engine
        self._study_id = -1 if storage is None else storage.get_study_id_from_name(study.study_name)
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lease primitives ---------------------------------------------------
    def _where(self, key: str) -> Any:
        return sa.and_(_TABLE.c.study_id == self._study_id, _TABLE.c.key == key)

    def _read(self, conn: sa.Connection, key: str) -> tuple[datetime, str | None]:
        now = conn.execute(sa.select(sa.func.now())).scalar_one().replace(tzinfo=None)
        raw = conn.execute(sa.select(_TABLE.c.value_json).where(self._where(key))).scalar_one_or_none()
        return now, raw

    def _value(self, now: datetime) -> str:
        return json.dumps({"owner": self._owner, "beat": now.isoformat()})

    def _stale(self, raw: str, now: datetime) -> bool:
        try:
            beat = datetime.fromisoformat(json.loads(raw)["beat"])
        except (ValueError, KeyError, TypeError):
            return True
        return now - beat > timedelta(seconds=self._grace)

    def holder(self, key: str) -> str | None:
        """The ``host:pid`` holding ``key``, or None when it is free."""
        if self._engine is None:
            return self.name if key in self._held else None
        with self._engine.connect() as conn:
            _, raw = self._read(conn, key)
        if raw is None:
            return None
        owner = str(json.loads(raw).get("owner", "?"))
        return owner.split("/", 1)[0]

    def holds(self, key: str) -> bool:
        return key in self._held

    def live_workers(self) -> list[str]:
        """``host:pid`` of the other workers whose slot lease is alive (heartbeat within the grace period)."""
        if self._engine is None:
            return []
        with self._engine.connect() as conn:
            now = conn.execute(sa.select(sa.func.now())).scalar_one().replace(tzinfo=None)
            rows = conn.execute(
                sa.select(_TABLE.c.value_json).where(
                    _TABLE.c.study_id == self._study_id, _TABLE.c.key.like("lease:worker.%")
                )
            ).scalars()
            alive = [json.loads(raw) for raw in rows if not self._stale(raw, now)]
        return [str(v.get("owner", "?")).split("/", 1)[0] for v in alive if v.get("owner") != self._owner]

    def try_acquire(self, key: str, keep_alive: bool = True) -> bool:
        """Take ``key`` if it is free or its holder's heartbeat is stale; True when held."""
        if key in self._held:
            return True
        if self._engine is None:
            self._held[key] = ""
            return True
        with self._lock:
            try:
                with self._engine.begin() as conn:
                    now, raw = self._read(conn, key)
                    value = self._value(now)
                    if raw is None:
                        conn.execute(sa.insert(_TABLE).values(study_id=self._study_id, key=key, value_json=value))
                    elif not self._stale(raw, now):
                        return False
                    else:
                        swap = sa.update(_TABLE).where(self._where(key), _TABLE.c.value_json == raw)
                        swapped = conn.execute(swap.values(value_json=value))
                        if swapped.rowcount != 1:
                            return False
                        logger.info("worker %s stopped sending heartbeats: %s took over %s",
                                    str(json.loads(raw).get("owner", "?")).split("/", 1)[0], self.name, key)
            except sa.exc.IntegrityError:
                return False  # another worker inserted it first
            self._held[key] = value
        if keep_alive:
            self._start_heartbeat()
        return True

    def release(self, key: str) -> None:
        """Give ``key`` back (only if this worker still holds it)."""
        with self._lock:
            value = self._held.pop(key, None)
            if value and self._engine is not None:
                with self._engine.begin() as conn:
                    conn.execute(sa.delete(_TABLE).where(self._where(key), _TABLE.c.value_json == value))

    def _renew(self) -> None:
        with self._lock:
            if self._engine is None:
                return
            for key, old in list(self._held.items()):
                with self._engine.begin() as conn:
                    now, _ = self._read(conn, key)
                    value = self._value(now)
                    done = conn.execute(
                        sa.update(_TABLE).where(self._where(key), _TABLE.c.value_json == old).values(value_json=value)
                    )
                if done.rowcount == 1:
                    self._held[key] = value
                else:
                    del self._held[key]
                    logger.warning("worker %s lost %s: its heartbeat was late by more than %d s",
                                   self.name, key, self._grace)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._renew()
            except sa.exc.SQLAlchemyError as exc:  # a lost connection: try again at the next beat
                logger.warning("lease heartbeat of %s failed: %s", self.name, type(exc).__name__)

    def _start_heartbeat(self) -> None:
        if self._engine is not None and self._thread is None:
            self._thread = threading.Thread(target=self._heartbeat, name="amct_opt-lease", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the heartbeat and release every lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for key in list(self._held):
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self.release(key)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The budget mutex: the server's lock on PostgreSQL and MySQL (freed if its holder dies), else a lease."""
        dialect = None if self._engine is None else self._engine.dialect.name
        if self._engine is not None and dialect == "postgresql":
            with self._engine.connect() as conn:  # the lock ends with this connection's transaction
                key = sa.cast(self._study_id, sa.Integer)
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.cast(_PG_LOCK_SPACE, sa.Integer), key)))
                yield
            return
        if self._engine is not None and dialect in ("mysql", "mariadb"):
            name = f"amct_opt.budget.{self._study_id}"
            with self._engine.connect() as conn:
                while conn.execute(sa.select(sa.func.get_lock(name, 60))).scalar() != 1:
                    logger.info("%s waiting for the budget lock of study %r", self.name, self.study.study_name)
                try:
                    yield
                finally:
                    conn.execute(sa.select(sa.func.release_lock(name)))
            return
        delay = 0.005
        while not self.try_acquire(BUDGET_LEASE, keep_alive=False):
            time.sleep(delay)
            delay = min(2 * delay, 0.1)
        try:
            yield
        finally:
            self.release(BUDGET_LEASE)

    # -- what the workers share ---------------------------------------------
    def join(self) -> int:
        """Hold the lowest free worker slot; a worker other than slot 0 reseeds the study's sampler."""
        slot = 0
        while not self.try_acquire(f"lease:worker.{slot}"):
            slot += 1
        if slot:
            self.study.sampler.reseed_rng()
        return slot

    def once(self, stage: str, stored: Callable[[], T | None], compute: Callable[[], T]) -> tuple[T, bool]:
        """``(value, computed)``: ``stored()`` when published, else ``compute()`` by one worker only.

        ``compute`` must publish its value so that ``stored`` returns it.  The
        worker holding :data:`SETUP_LEASE` computes; the others poll until the
        value is published, or take over when the holder's heartbeat stops.
        """
        waited_since: float | None = None
        reminded = 0.0
        started = time.monotonic()
        while True:
            value = stored()
            if value is not None:
                if waited_since is not None:
                    logger.info("%s published after %.0f s of waiting", stage, time.monotonic() - waited_since)
                return value, False
            if self.try_acquire(SETUP_LEASE):
                value = stored()  # published between the look and the election
                return (value, False) if value is not None else (compute(), True)
            now = time.monotonic()
            if waited_since is None or now - reminded >= REMIND_S:
                logger.info(
                    "%s waiting for worker %s to publish the %s in study %r (checked every %g s; "
                    "taken over if its heartbeat stops for %d s)",
                    self.name, self.holder(SETUP_LEASE) or "?", stage, self.study.study_name, POLL_S, self._grace,
                )
                waited_since = now if waited_since is None else waited_since
                reminded = now
            time.sleep(poll_delay(now - started, POLL_S))

    def claim(
        self,
        study: SearchStudy,
        trial: optuna.Trial,
        plan: Plan,
        budget: int | None,
        finished: Callable[[list[TrialRecord]], str | None] | None = None,
    ) -> str | None:
        """Mark ``trial`` as evaluating ``plan`` and return None, or say why it must not evaluate.

        Under :data:`BUDGET_LEASE`: the plan must be neither stored nor claimed
        by a running trial, and the evaluations stored plus those running must
        stay below ``budget``.  So ``n_trials`` is exact across workers.
        ``finished(records)``, given every stored evaluation, says why the search
        is already over (another worker's results proved it), or None.
        """
        wanted = study.key(plan)
        _first_heartbeat(self.study, trial._trial_id)
        with self.locked():
            records, running = _stored_and_running(study, exclude=trial.number)
            if any((other := study.plan_of(t)) is not None and study.key(other) == wanted for t in running):
                return "the same config is being evaluated by another worker"
            if any(study.key(r.plan) == wanted for r in records):
                return "the same config was evaluated meanwhile"
            if budget is not None and len(records) + len(running) >= budget:
                return "budget"
            if finished is not None and (reason := finished(records)) is not None:
                return reason
            trial.set_user_attr(WORKER_ATTR, self.name)
        return None

    def wait_for_others(self, study: SearchStudy, budget: int | None) -> bool:
        """Wait while other workers evaluate; True when a failed one freed budget for more.

        Each look is taken under :data:`BUDGET_LEASE`, so a claim is either seen
        here as running or made after this worker's last result was stored
        (and then judged with it).
        """
        logged = False
        while True:
            with self.locked():
                records, running = _stored_and_running(study)
            if budget is not None and len(records) + len(running) < budget:
                return True
            if not running:
                return False
            if not logged:
                logger.info("%s waiting for %d evaluation(s) of other workers to finish", self.name, len(running))
                logged = True
            time.sleep(POLL_S)
            fail_stale_trials(study.study)
