"""One worker of the distributed tests: a tiny torch model, a deterministic evaluator, one call.

Run as ``python tests/distributed/job.py SETTINGS_JSON``; prints the result as
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
PENALTY = {"fc0": 0.030, "fc1": 0.002, "fc2": 0.021, "fc3": 0.004, "fc4": 0.012, "head": 0.050}
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

    def __init__(self, folder: Path, cost_s: float = 0.0, hang: str | None = None) -> None:
        self.calls = folder / "calls.log"
        self.cost_s = cost_s
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
        model(self.data)

    def evaluate(self, model: nn.Module) -> float:
        if not isinstance(model, QuantizedModel):
            self._log("float")
            return 1.0
        plan = model.plan
        self.evaluations += 1
        if self.hang == f"evaluate:{self.evaluations}":
            self._hang("".join("1" if plan[name] else "0" for name in PENALTY))
        time.sleep(self.cost_s)
        self._log("evaluate", "".join("1" if plan[name] else "0" for name in PENALTY))
        return 1.0 - sum(PENALTY[name] for name, on in plan.items() if on)

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        loss = round(original_metric - new_metric, 9)
        return loss < TARGET, loss


def run(settings: dict[str, Any]) -> dict[str, Any]:
    """One ``accuracy_based_auto_calibration`` call as described by ``settings``."""
    folder = Path(settings["folder"])
    work = folder / settings.get("name", f"worker_{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # amct_log/ goes here
    model = Chain().eval()
    data = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    amct.create_quant_config(str(work / "config.json"), model, data)
    strategy = OptunaSearch(
        storage=settings["storage"], study_name=settings["study"], n_trials=settings["n_trials"],
        seed=settings.get("seed", 0), sampler=settings.get("sampler"),
    )
    evaluator = PlanEvaluator(folder, settings.get("cost_s", 0.0), settings.get("hang"))
    result = amct.accuracy_based_auto_calibration(
        model, evaluator, str(work / "config.json"), str(work / "record.txt"), str(work / "out" / "chain"),
        data, input_names=["x"], output_names=["y"], strategy=strategy,
    )
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
        "work": str(work),
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
