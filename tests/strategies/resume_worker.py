"""One search of the SIGKILL resume test, run as ``python resume_worker.py FOLDER``.

``FOLDER/setup.pt`` holds the trained SmallNet's weights, the data and the
target; every ``calibration()`` and ``evaluate()`` call appends a line to
``FOLDER/calls.log``: ``calibration PID``, ``start PID PLAN`` and, once the
(slow) evaluation is done, ``end PID PLAN``, where PLAN is ``float`` or one
``1``/``0`` per layer.  The result summary goes to stdout as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from conftest import SmallNet, Trained
from search_run import DistortionEvaluator

import amct_opt as amct
from amct_opt.quant_model import QuantizedModel
from amct_opt.strategies import OptunaSearch

#: Seconds each evaluation takes, so that the test can kill the worker in the middle of one.
SLOW_S = 0.6
N_TRIALS = 8


class LoggingEvaluator(DistortionEvaluator):
    def __init__(self, data: Trained, target: float, log: Path) -> None:
        super().__init__(data, target)
        self.log = log

    def _write(self, line: str) -> None:
        with self.log.open("a") as handle:
            handle.write(f"{line}\n")
            handle.flush()
            os.fsync(handle.fileno())

    def calibration(self, model: torch.nn.Module) -> None:
        self._write(f"calibration {os.getpid()}")
        super().calibration(model)

    def evaluate(self, model: torch.nn.Module) -> float:
        plan = "".join("1" if on else "0" for on in model.plan.values()) if isinstance(model, QuantizedModel) else "float"
        self._write(f"start {os.getpid()} {plan}")
        metric = super().evaluate(model)
        time.sleep(SLOW_S)
        self._write(f"end {os.getpid()} {plan}")
        return metric


def main(folder: Path) -> None:
    setup = torch.load(folder / "setup.pt", weights_only=True)
    model = SmallNet()
    model.load_state_dict(setup["weights"])
    model.eval()
    data = Trained(model, setup["train_x"], setup["train_y"], setup["test_x"], setup["test_y"])
    evaluator = LoggingEvaluator(data, float(setup["target"]), folder / "calls.log")
    result = amct.accuracy_based_auto_calibration(
        model, evaluator, str(folder / "config.json"), str(folder / "record.txt"), str(folder / "out" / "small"),
        setup["train_x"][:1],
        strategy=OptunaSearch(n_trials=N_TRIALS, seed=0, storage=f"sqlite:///{(folder / 'study.db').as_posix()}",
                              study_name="resume", show_progress=False),
    )
    print(json.dumps({"evaluations": result.evaluations, "this_run": result.evaluations_this_run,
                      "reachable": result.reachable, "deploy": result.paths["deploy_model"]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
