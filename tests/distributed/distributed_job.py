"""One worker of the distributed tests: a tiny torch model, a deterministic evaluator, one call.

Run as ``python tests/distributed/distributed_job.py SETTINGS_JSON``; prints the result as
one JSON line.  The evaluator's metric is a fixed function of the plan (a
penalty per quantized layer), so every worker and a single-process run agree
on every config.  Each ``calibration()`` and ``evaluate()`` call appends a line
``<kind> <pid> <plan bits>`` to ``calls.log`` in the shared folder, so a test
counts the calls of all workers together.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import amct_opt as amct
from amct_opt.quant_model import QuantizedModel
from amct_opt.strategies import OptunaSearch

#: Metric lost by quantizing each layer; a config is feasible when the total stays below TARGET.
#: "hard": the best config (fc1, fc2, fc3 INT8) is off BinarySearch's path.  "on_path": the best
#: config (fc3, fc4, head INT8) is BinarySearch's first step over the ranking (fc0 fc1 fc2 fc3 head
#: fc4, most sensitive first), so every run finds it; 26 configs quantize more, so no run can prove
#: it optimal early and every search runs to its budget.
LANDSCAPES = {
    "hard": {"fc0": 0.030, "fc1": 0.002, "fc2": 0.021, "fc3": 0.004, "fc4": 0.012, "head": 0.050},
    "on_path": {"fc0": 0.020, "fc1": 0.020, "fc2": 0.027, "fc3": 0.004, "fc4": 0.007, "head": 0.003},
}
TARGET = 0.03


class Chain(nn.Module):
    """Six Linear layers of distinct sizes, so that no two configs quantize the same share."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        sizes = [12, 20, 28, 16, 24, 10]
        self.fc0 = nn.Linear(8, sizes[0])
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])
        self.fc4 = nn.Linear(sizes[3], sizes[4])
        self.head = nn.Linear(sizes[4], sizes[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.fc0, self.fc1, self.fc2, self.fc3, self.fc4):
            x = torch.relu(layer(x))
        return self.head(x)


class PlanEvaluator(amct.AutoCalibrationEvaluatorBase):
    """metric = 1 - the penalties of the quantized layers; optionally slow, or hanging once."""

    def __init__(
        self, folder: Path, landscape: str = "hard", cost_s: float = 0.0, calibration_s: float = 0.0,
        hang: str | None = None,
    ) -> None:
        self.calls = folder / "calls.log"
        self.penalty = LANDSCAPES[landscape]
        self.cost_s = cost_s
        self.calibration_s = calibration_s
        self.hang = hang  # "calibration", or "evaluate:<n>" for the n-th evaluation of this worker
        self.evaluations = 0
        self.data = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))

    def _log(self, kind: str, detail: str = "") -> None:
        with self.calls.open("a", encoding="utf-8") as handle:
            handle.write(f"{kind} {os.getpid()} {detail}\n")

    def _hang(self, kind: str) -> None:
        self._log("hang", kind)
        time.sleep(3600)

    def calibration(self, model: nn.Module) -> None:
        self._log("calibration")
        if self.hang == "calibration":
            self._hang("calibration")
        time.sleep(self.calibration_s)
        model(self.data)

    def evaluate(self, model: nn.Module) -> float:
        if not isinstance(model, QuantizedModel):
            self._log("float")
            return 1.0
        plan = model.plan
        bits = "".join("1" if plan[name] else "0" for name in self.penalty)
        self.evaluations += 1
        if self.hang == f"evaluate:{self.evaluations}":
            self._hang(bits)
        time.sleep(self.cost_s)
        self._log("evaluate", bits)
        return 1.0 - sum(self.penalty[name] for name, on in plan.items() if on)

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        loss = round(original_metric - new_metric, 9)
        return loss < TARGET, loss


def job(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``accuracy_based_auto_calibration`` arguments (but the strategy) described by ``settings``."""
    folder = Path(settings["folder"])
    work = folder / settings.get("name", f"worker_{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # amct_log/ goes here
    model = Chain().eval()
    data = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    amct.create_quant_config(str(work / "config.json"), model, data)
    evaluator = PlanEvaluator(
        folder, settings.get("landscape", "hard"), settings.get("cost_s", 0.0),
        settings.get("calibration_s", 0.0), settings.get("hang"),
    )
    return {
        "model": model, "model_evaluator": evaluator, "config_file": str(work / "config.json"),
        "record_file": str(work / "record.txt"), "save_dir": str(work / "out" / "chain"), "input_data": data,
        "input_names": ["x"], "output_names": ["y"],
    }


def cli_job() -> dict[str, Any]:
    """The job of ``amct-opt worker tests/distributed/distributed_job.py:cli_job`` ($DISTRIBUTED_JOB settings)."""
    return {**job(json.loads(os.environ["DISTRIBUTED_JOB"])), "strategy_options": {"seed": 0}}


def run(settings: dict[str, Any]) -> dict[str, Any]:
    """One ``accuracy_based_auto_calibration`` call as described by ``settings``."""
    strategy = OptunaSearch(
        storage=settings["storage"], study_name=settings["study"], n_trials=settings["n_trials"],
        seed=settings.get("seed", 0), sampler=settings.get("sampler"),
    )
    result = amct.accuracy_based_auto_calibration(strategy=strategy, **job(settings))
    return {
        "pid": os.getpid(),
        "final_plan": result.final_plan,
        "final_metric": result.final_metric,
        "evaluations": result.evaluations,
        "evaluations_this_run": result.evaluations_this_run,
        "calibration_calls": result.calibration_calls,
        "storage": result.storage,
        "summary": result.summary(),
        "stop_reason": result.stop_reason,
        "work": os.getcwd(),
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
