"""Fixtures and helpers of the distributed tests: the database servers, fresh studies, worker processes.

The PostgreSQL tests skip when no server answers on 127.0.0.1:5432, unless
``AMCT_OPT_REQUIRE_POSTGRES=1`` (set by ``.ci/run`` on the machine that has
one): then an unreachable server fails them.  The MariaDB test always skips
when its server is missing.  (No conftest.py here: other tests import
``conftest`` by name.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa

POSTGRES_URL = os.environ.get("AMCT_OPT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("AMCT_OPT_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")


def _unreachable(url: str) -> str | None:
    """None when ``url`` answers, else why not."""
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any driver error means "not reachable"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    why = _unreachable(POSTGRES_URL)
    if why is not None:
        message = f"PostgreSQL at {POSTGRES_URL} is unreachable ({why})"
        if os.environ.get("AMCT_OPT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message}, and AMCT_OPT_REQUIRE_POSTGRES=1 says it must run here")
        pytest.skip(f"{message}; start it, or set AMCT_OPT_TEST_POSTGRES to another server")
    return POSTGRES_URL


@pytest.fixture(scope="session")
def mariadb_url() -> str:
    why = _unreachable(MARIADB_URL)
    if why is not None:
        pytest.skip(f"MariaDB/MySQL at {MARIADB_URL} is unreachable ({why}); set AMCT_OPT_TEST_MARIADB")
    return MARIADB_URL


def _delete_study(url: str, name: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass


@pytest.fixture
def study_names() -> Iterator[list[tuple[str, str]]]:
    """Register ``(url, name)`` pairs; each study is deleted after the test."""
    created: list[tuple[str, str]] = []
    yield created
    for url, name in created:
        _delete_study(url, name)


JOB = Path(__file__).with_name("distributed_job.py")
#: Short heartbeats, so that a killed worker's trial and leases go stale within seconds.
FAST_HEARTBEAT = {"AMCT_OPT_HEARTBEAT_S": "1", "AMCT_OPT_GRACE_S": "3"}


def new_study(registry: list[tuple[str, str]], url: str, label: str) -> str:
    name = f"test_{label}_{uuid.uuid4().hex[:10]}"
    registry.append((url, name))
    return name


@dataclass
class Worker:
    """A worker process running ``job.py``."""

    process: subprocess.Popen[str]

    def finish(self, timeout: float = 120) -> tuple[dict[str, Any], str]:
        """``(result, stderr)``; fails the test when the worker failed."""
        out, err = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, f"worker {self.process.pid} failed:\n{err[-4000:]}"
        return json.loads(out.strip().splitlines()[-1]), err


def start_worker(settings: dict[str, Any], env: dict[str, str] | None = None) -> Worker:
    full_env = {**os.environ, **(env or {})}
    process = subprocess.Popen(
        [sys.executable, str(JOB), json.dumps(settings)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
    )
    return Worker(process)


def calls(folder: Path) -> list[list[str]]:
    """The evaluator calls of every worker: ``[kind, pid, detail...]`` per line."""
    path = folder / "calls.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []
