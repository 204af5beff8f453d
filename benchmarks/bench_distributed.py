"""Benchmark: a distributed search's throughput with 1, 2 and 4 worker processes.

Every worker is a separate process running the same
``accuracy_based_auto_calibration(..., strategy=OptunaSearch(storage=<server
database>, study_name=..., n_trials=N))`` call on a small real torch model (12
Linear layers).  The evaluator costs a fixed sleep (the machine has 2 cores,
so a compute-bound evaluator could not scale); its metric is a fixed function
of the plan.  Every evaluation appends its plan to a file, so the benchmark
counts the evaluations really run, and their duplicates, across all workers.

Reported per worker count:

* search throughput: evaluations per minute between the first evaluation's
  start and the last one's end (the study's trial timestamps);
* end-to-end: wall time from starting the processes to the last exit
  (imports, the one calibration, the search and every worker's export);
* evaluations run, duplicates (must be 0) and calibrations (must be 2: the
  calibration and the ranking, by one worker).

With ``--repeats R`` the worker counts run R times, interleaved, so that load
from other processes on the machine hits every worker count alike; each row
shows the median run (the upper one of an even count), and the speedup
compares these.  The table is printed
and written to ``benchmarks/results/bench_distributed.md``.

Run: ``python benchmarks/bench_distributed.py [--storage URL] [--trials 60] [--cost 1.0] [--repeats 2]``
(``AMCT_OPT_STORAGE`` also sets the URL; default: the local PostgreSQL server).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

import amct_opt as amct
from amct_opt._io import atomic_write_text
from amct_opt.quant_model import QuantizedModel
from amct_opt.storage import mask_url
from amct_opt.strategies import OptunaSearch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_distributed.md"
DEFAULT_STORAGE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
WORKER_COUNTS = (1, 2, 4)
N_LAYERS = 12
TARGET = 0.05


class Tower(nn.Module):
    """Twelve Linear layers of distinct widths."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        widths = [16 + 4 * i for i in range(N_LAYERS + 1)]
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(N_LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class SleepEvaluator(amct.AutoCalibrationEvaluatorBase):
    """Each evaluation sleeps ``cost_s``; the metric drops by a fixed penalty per quantized layer."""

    def __init__(self, calls: Path, cost_s: float) -> None:
        self.calls = calls
        self.cost_s = cost_s
        penalties = torch.rand(N_LAYERS, generator=torch.Generator().manual_seed(3)) * 0.02
        self.penalty = {f"layers.{i}": float(p) for i, p in enumerate(penalties)}
        self.data = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))

    def _log(self, line: str) -> None:
        with self.calls.open("a", encoding="utf-8") as handle:
            handle.write(f"{line}\n")

    def calibration(self, model: nn.Module) -> None:
        self._log(f"calibration {os.getpid()}")
        model(self.data)

    def evaluate(self, model: nn.Module) -> float:
        time.sleep(self.cost_s)
        if not isinstance(model, QuantizedModel):
            return 1.0
        plan = model.plan
        self._log(f"evaluate {''.join('1' if plan[name] else '0' for name in self.penalty)}")
        return 1.0 - sum(self.penalty[name] for name, on in plan.items() if on)

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        loss = original_metric - new_metric
        return loss < TARGET, loss


def worker(settings: dict[str, Any]) -> None:
    """One worker process: the same call as every other worker."""
    folder = Path(settings["folder"])
    work = folder / f"worker_{os.getpid()}"
    work.mkdir(parents=True)
    os.chdir(work)
    model = Tower().eval()
    data = torch.randn(2, 16)
    amct.create_quant_config(str(work / "config.json"), model, data)
    strategy = OptunaSearch(
        storage=settings["storage"], study_name=settings["study"], n_trials=settings["trials"],
        show_progress=False,
    )
    amct.accuracy_based_auto_calibration(
        model, SleepEvaluator(folder / "calls.log", settings["cost"]), str(work / "config.json"),
        str(work / "record.txt"), str(work / "out" / "tower"), data, strategy=strategy,
    )


def _delete(storage: str, study: str) -> None:
    try:
        optuna.delete_study(study_name=study, storage=storage)
    except KeyError:
        pass


def measure(storage: str, n_workers: int, trials: int, cost: float) -> dict[str, Any]:
    """Run ``n_workers`` processes on a fresh study; return the measurements."""
    study_name = f"bench_distributed_{n_workers}_{os.getpid()}_{int(time.time())}"
    _delete(storage, study_name)
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        settings = json.dumps(
            {"folder": tmp, "storage": storage, "study": study_name, "trials": trials, "cost": cost}
        )
        started = time.monotonic()
        procs = [
            subprocess.Popen([sys.executable, __file__, "--worker", settings], stderr=subprocess.PIPE, text=True)
            for _ in range(n_workers)
        ]
        errors = [p.communicate()[1] for p in procs]
        wall = time.monotonic() - started
        failed = [e for p, e in zip(procs, errors) if p.returncode != 0]
        if failed:
            raise SystemExit(f"a worker failed:\n{failed[0][-3000:]}")
        calls = (Path(tmp) / "calls.log").read_text().splitlines()
    study = optuna.load_study(study_name=study_name, storage=storage)
    evaluated = [
        t for t in study.get_trials(states=(TrialState.COMPLETE,))
        if "metric" in t.user_attrs and "cached_from" not in t.user_attrs
    ]
    window = (
        max(t.datetime_complete for t in evaluated) - min(t.datetime_start for t in evaluated)
    ).total_seconds()
    plans = [line.split()[1] for line in calls if line.startswith("evaluate")]
    _delete(storage, study_name)
    return {
        "workers": n_workers,
        "evaluations": len(plans),
        "in_study": len(evaluated),
        "duplicates": len(plans) - len(set(plans)),
        "calibrations": Counter(line.split()[0] for line in calls)["calibration"],
        "search_s": window,
        "per_min": 60 * len(evaluated) / window,
        "wall_s": wall,
    }


def table(runs: dict[int, list[dict[str, Any]]], trials: int, cost: float, storage: str, out: str = "") -> str:
    """The median run of each worker count, and every run's throughput."""
    rows = [sorted(found, key=lambda r: r["per_min"])[len(found) // 2] for found in runs.values()]
    base = rows[0]["per_min"]
    repeats = len(next(iter(runs.values())))
    lines = [
        "# Distributed search throughput",
        "",
        f"`python benchmarks/bench_distributed.py --trials {trials} --cost {cost:g} --repeats {repeats}{out}` on "
        f"{mask_url(storage)}; {os.cpu_count()} CPU cores; every evaluation sleeps {cost:g} s; "
        f"budget n_trials={trials}; median (upper, for an even count) of {repeats} run(s) per worker count.",
        "",
        "| workers | evaluations (study / run) | duplicates | calibrations | search s | evaluations/min | speedup "
        "| end-to-end s | every run's evaluations/min |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        every = ", ".join(f"{x['per_min']:.1f}" for x in runs[r["workers"]])
        lines.append(
            f"| {r['workers']} | {r['in_study']} / {r['evaluations']} | {r['duplicates']} | {r['calibrations']} | "
            f"{r['search_s']:.1f} | {r['per_min']:.1f} | {r['per_min'] / base:.2f}x | {r['wall_s']:.1f} | {every} |"
        )
    lines += [
        "",
        "Search: from the first evaluation's start to the last one's end (study timestamps).  End-to-end: "
        "process start to the last exit, including imports, the one calibration and every worker's export.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("AMCT_OPT_STORAGE", DEFAULT_STORAGE))
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--cost", type=float, default=1.0)
    parser.add_argument("--workers", type=int, nargs="+", default=list(WORKER_COUNTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the markdown table goes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        logging.basicConfig(level=logging.WARNING)
        worker(json.loads(args.worker))
        return
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.workers}
    for _ in range(args.repeats):
        for n in args.workers:
            runs[n].append(measure(args.storage, n, args.trials, args.cost))
            print(f"{n} worker(s): {runs[n][-1]['per_min']:.1f} evaluations/min", flush=True)
    out = "" if args.out == RESULTS else f" --out {args.out}"
    text = table(runs, args.trials, args.cost, args.storage, out)
    print(text)
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
