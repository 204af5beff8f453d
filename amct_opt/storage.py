"""Where studies live: SQLAlchemy URLs, the default SQLite file, and password masking."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError

from .errors import StorageError

__all__ = [
    "DEFAULT_DB_NAME",
    "default_storage_url",
    "mask_url",
    "mask_secrets",
    "open_storage",
    "describe_storage",
    "heartbeat_settings",
]

logger = logging.getLogger(__name__)

DEFAULT_DB_NAME = "amct_opt.db"
#: A worker that stops sending heartbeats for this long has its RUNNING trial failed and retried.
#: The environment variables AMCT_OPT_HEARTBEAT_S and AMCT_OPT_GRACE_S override them.
HEARTBEAT_INTERVAL_S = 5
GRACE_PERIOD_S = 20
#: Tries at opening an RDB storage whose schema another process is creating at the same moment.
_SCHEMA_ATTEMPTS = 5

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)")


def default_storage_url(output_dir: str | Path) -> str:
    """``sqlite:///<output_dir>/amct_opt.db`` with an absolute path."""
    return f"sqlite:///{(Path(output_dir).resolve() / DEFAULT_DB_NAME).as_posix()}"


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        if "@" not in url:
            return mask_secrets(url)
        # Not a URL, but it may still hold "user:password@": keep only the scheme and the host part.
        return f"{url.split(':', 1)[0]}:***@{url.rpartition('@')[2]}"


def mask_secrets(text: str) -> str:
    """Mask every ``scheme://user:password@`` password found in free text."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)


def describe_storage(storage: str | BaseStorage) -> str:
    if isinstance(storage, str):
        return mask_url(storage)
    if isinstance(storage, RDBStorage):
        return mask_url(str(storage.engine.url))
    return type(storage).__name__


def _seconds_from_env(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise StorageError(f"environment variable {name}: expected whole seconds >= 1, got {text!r}")
    return value


def heartbeat_settings() -> tuple[int, int]:
    """``(heartbeat interval, grace period)`` in seconds, from the environment or the defaults."""
    interval = _seconds_from_env("AMCT_OPT_HEARTBEAT_S", HEARTBEAT_INTERVAL_S)
    grace = _seconds_from_env("AMCT_OPT_GRACE_S", max(GRACE_PERIOD_S, 2 * interval))
    if grace <= interval:
        raise StorageError(
            f"environment variable AMCT_OPT_GRACE_S: the grace period ({grace} s) must be longer "
            f"than the heartbeat interval ({interval} s)"
        )
    return interval, grace


def _engine_kwargs(url: str) -> dict[str, object]:
    if url.startswith("sqlite"):
        # Several processes on one SQLite file wait for the lock instead of failing at once;
        # transactions are begun by _immediate_transactions, not by the sqlite3 module.
        return {"connect_args": {"timeout": 60, "isolation_level": None}}
    return {"pool_pre_ping": True}


def _immediate_transactions(engine: Engine) -> None:
    """Begin every SQLite transaction with ``BEGIN IMMEDIATE`` (it takes the write lock at once).

    The sqlite3 module would begin one only at the first write, so a read-check-write such as
    Optuna popping a queued trial (read WAITING, set RUNNING) could succeed in two processes
    at once, and both would run the same trial.
    """

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _rdb_storage(url: str, interval: int, grace: int) -> RDBStorage:
    """An RDBStorage; retried when another process creates the same new schema at the same moment."""
    attempt = 0
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url,
                    engine_kwargs=_engine_kwargs(url),
                    heartbeat_interval=interval,
                    grace_period=grace,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                )
            if url.startswith("sqlite"):
                _immediate_transactions(storage.engine)
            return storage
        except DatabaseError as exc:
            # Both created the tables or inserted alembic_version: the schema exists now.
            race = isinstance(exc, IntegrityError) or "already exists" in str(exc)
            attempt += 1
            if not race or attempt >= _SCHEMA_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)


def open_storage(storage: str | BaseStorage) -> BaseStorage:
    """An Optuna storage for ``storage`` (a SQLAlchemy URL or a storage object).

    RDB storages get heartbeats, so a crashed worker's RUNNING trial is failed
    and re-queued with the same parameters.  Connection problems become a
    :class:`StorageError` with the password masked.
    """
    if isinstance(storage, BaseStorage):
        return storage
    if not isinstance(storage, str) or not storage:
        raise StorageError(
            f"storage: expected a SQLAlchemy URL string or an optuna storage, got {storage!r}"
        )
    try:
        make_url(storage)
    except (ArgumentError, ValueError) as exc:
        raise StorageError(f"storage: {mask_url(storage)!r} is not a SQLAlchemy URL ({exc})") from None
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    interval, grace = heartbeat_settings()
    try:
        return _rdb_storage(storage, interval, grace)
    except Exception as exc:  # noqa: BLE001 - drivers raise many types; all mean "unreachable"
        message = mask_secrets(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise StorageError(
            f"storage: cannot open {mask_url(storage)!r}: {message}"
        ) from None
