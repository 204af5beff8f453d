"""``amct-opt worker``: run workers of a distributed search, in one or several local processes.

A *job* is ``module:function`` (the current folder is importable) or
``path/to/file.py:function``.  The function takes no argument and returns the
keyword arguments of :func:`amct_opt.accuracy_based_auto_calibration`
(``model``, ``model_evaluator``, ``config_file``, ``record_file``,
``save_dir``, ``input_data`` and optionally ``input_names``, ``output_names``,
``dynamic_axes``, ``sensitivity``), plus an optional ``"strategy_options"``
dict of :class:`~amct_opt.strategies.OptunaSearch` arguments (``sampler``,
``seed``, ``objective`` ...).  Each worker runs
``OptunaSearch(storage=..., study_name=..., n_trials=..., **strategy_options)``.

Example, on every machine::

    export AMCT_OPT_STORAGE=postgresql+psycopg://amct@db-host:5432/amct   # password in ~/.pgpass
    amct-opt worker my_job:build --study resnet50-int8 --n-trials 200 --processes 2
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import AmctError, InputError
from .storage import mask_secrets

__all__ = ["configure_worker_parser", "load_job", "run_job", "run_workers", "worker_command"]

logger = logging.getLogger("amct_opt")

#: What a job's dict may hold besides the arguments of accuracy_based_auto_calibration.
STRATEGY_OPTIONS = "strategy_options"


def load_job(spec: str) -> Callable[[], Mapping[str, Any]]:
    """The callable named by ``module:function`` or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise InputError(f"JOB: expected 'module:function' or 'path/to/file.py:function', got {spec!r}")
    try:
        if target.endswith(".py"):
            location = importlib.util.spec_from_file_location(Path(target).stem, target)
            if location is None or location.loader is None or not Path(target).is_file():
                raise ImportError(f"no file {target!r}")
            module = importlib.util.module_from_spec(location)
            location.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
        job = getattr(module, name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"JOB: cannot load {spec!r}: {exc}") from None
    if not callable(job):
        raise InputError(f"JOB: {spec!r} is a {type(job).__name__}, not a callable")
    return job  # type: ignore[no-any-return]


def run_job(spec: str, storage: str, study_name: str | None, n_trials: int | None, timeout: float | None) -> Any:
    """One worker: build the job's arguments and run the search against the shared study."""
    from .auto_calibration import accuracy_based_auto_calibration
    from .strategies import OptunaSearch

    kwargs = load_job(spec)()
    if not isinstance(kwargs, Mapping):
        raise InputError(f"JOB: {spec!r} must return a dict of accuracy_based_auto_calibration arguments, "
                         f"got {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    if "strategy" in kwargs:
        raise InputError(f"JOB: {spec!r} returned 'strategy'; the worker builds OptunaSearch itself, "
                         f"pass its options as {STRATEGY_OPTIONS!r}")
    options = dict(kwargs.pop(STRATEGY_OPTIONS, None) or {})
    strategy = OptunaSearch(storage=storage, study_name=study_name, n_trials=n_trials, timeout=timeout, **options)
    return accuracy_based_auto_calibration(strategy=strategy, **kwargs)


def _child(spec: str, storage: str, study_name: str | None, n_trials: int | None, timeout: float | None) -> None:
    """A worker process: run the job, print its summary; exit 2 on an amct_opt error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [worker %(process)d] %(name)s: %(message)s")
    try:
        result = run_job(spec, storage, study_name, n_trials, timeout)
    except AmctError as exc:
        print(f"amct-opt worker: error: {mask_secrets(str(exc))}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(result.summary(), flush=True)


def run_workers(
    spec: str, storage: str, study_name: str | None = None, n_trials: int | None = None,
    timeout: float | None = None, processes: int = 1,
) -> int:
    """Run ``processes`` workers of the job here; the exit status: 0 when every worker succeeded."""
    if processes < 1:
        raise InputError(f"--processes: expected an int >= 1, got {processes}")
    load_job(spec)  # fail here, once, on a wrong JOB
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_child, args=(spec, storage, study_name, n_trials, timeout), name=f"amct-opt-worker-{i}")
        for i in range(processes)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join()
    return max(abs(process.exitcode or 0) for process in workers)


def worker_command(args: argparse.Namespace) -> int:
    """``amct-opt worker``: the storage comes from --storage or AMCT_OPT_STORAGE."""
    storage = args.storage or os.environ.get("AMCT_OPT_STORAGE")
    if not storage:
        raise InputError("worker: give --storage URL or set AMCT_OPT_STORAGE (e.g. postgresql+psycopg://user@host/db)")
    return run_workers(args.job, storage, args.study, args.n_trials, args.timeout, args.processes)


def configure_worker_parser(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``amct-opt worker``; ``parser.set_defaults(run=worker_command)``."""
    parser.add_argument("job", metavar="JOB", help="module:function or path/to/file.py:function returning the "
                        "accuracy_based_auto_calibration arguments")
    parser.add_argument("--storage", help="SQLAlchemy URL of the shared study storage (default: $AMCT_OPT_STORAGE; "
                        "prefer the variable or ~/.pgpass to a password on the command line)")
    parser.add_argument("--study", help="study name, the same on every worker (default: the save_dir prefix)")
    parser.add_argument("--n-trials", type=int, help="global budget: evaluations in the study, all workers together")
    parser.add_argument("--timeout", type=float, help="seconds after which this worker stops")
    parser.add_argument("--processes", type=int, default=1, help="workers to run on this machine (default 1)")
    parser.set_defaults(run=worker_command)
