"""SearchProgress: one line per evaluation with the count, the best so far and an ETA; silent when off."""

from __future__ import annotations

import logging
import time

import pytest

from amct_opt.progress import SearchProgress
from amct_opt.types import EvalResult


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "amct_opt.search"]


def test_a_budget_gives_the_count_the_best_so_far_and_an_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amct_opt")
    progress = SearchProgress(True, budget=10, n_layers=4)
    progress.started -= 60  # one evaluation took a minute: nine more take nine
    progress.evaluated(3, 2, 0.5, EvalResult(1.0, True, 0.1), done=1)
    progress.evaluated(4, 3, 0.75, EvalResult(0.5, False, 0.6), done=2)
    first, second = lines(caplog)
    assert first.startswith("[eval 1/10] trial 3: 2/4 layers int8") and "best feasible 50.0%" in first
    assert "ETA 9m00s" in first
    assert "FAILS target" in second and "best feasible 50.0%" in second and "ETA 4m00s" in second


def test_a_timeout_alone_gives_the_time_left(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amct_opt")
    progress = SearchProgress(True, budget=None, n_layers=2)
    progress.deadline = time.monotonic() + 125.4
    progress.evaluated(1, 1, 0.5, EvalResult(1.0, False, 1.0), done=1)
    (line,) = lines(caplog)
    assert line.startswith("[eval 1] trial 1") and "best feasible none yet" in line
    assert "ETA 2m05s" in line or "ETA 2m04s" in line


def test_the_sooner_of_budget_and_timeout_sets_the_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amct_opt")
    progress = SearchProgress(True, budget=100, n_layers=2)
    progress.started -= 60
    progress.deadline = time.monotonic() + 30
    progress.evaluated(1, 1, 0.5, EvalResult(1.0, True, 0.0), done=1)
    assert "ETA 0m30s" in lines(caplog)[0] or "ETA 0m29s" in lines(caplog)[0]


def test_off_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="amct_opt")
    progress = SearchProgress(False, budget=5, n_layers=2)
    progress.evaluated(1, 1, 0.5, EvalResult(1.0, True, 0.0), done=1)
    progress.reused(2, 1)
    progress.note("waiting")
    assert lines(caplog) == []
