"""A search on the tiny model, run as a subprocess by the crash and concurrency tests.

Usage: ``python crash_job.py FOLDER [--strategy optuna]``; FOLDER holds ``quant.json``.

Environment:
    AMCT_TEST_PAUSE: ``<event>:<n>``; at the n-th event of this process, write
        ``FOLDER/paused`` and sleep, so that the test can kill the process there.
        Events: ``calibration`` (after the first batch of a calibration() call),
        ``evaluate`` (inside evaluate()), ``save`` (an ONNX file was just
        written), ``final_config`` (the final config is about to be written).
    AMCT_TEST_READY: when set, write ``FOLDER/ready`` once the imports are done.

Prints the result as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from reliability_kit import TinyEvaluator, input_data, tiny_model
from torch import nn

import amct_opt as amct
import amct_opt.export._api as export_api
from amct_opt import trial_export
from amct_opt.outputs import FINAL_CONFIG
from amct_opt.strategies import OptunaSearch

FOLDER = Path(sys.argv[1]).resolve()
EVENT, _, COUNT = os.environ.get("AMCT_TEST_PAUSE", "").partition(":")
SEEN: dict[str, int] = {}


def reached(event: str) -> None:
    SEEN[event] = SEEN.get(event, 0) + 1
    if event == EVENT and SEEN[event] == int(COUNT):
        (FOLDER / "paused").write_text(event)
        time.sleep(600)


class PausingEvaluator(TinyEvaluator):
    def calibration(self, model: nn.Module) -> None:
        self.calibration_calls += 1
        for index, x in enumerate(self.calib):
            model(x)
            if index == 0:
                reached("calibration")

    def evaluate(self, model: nn.Module) -> Any:
        reached("evaluate")
        return super().evaluate(model)


def wrap_writers() -> None:
    """Pause points inside the final export: after an ONNX file is saved, before the final config."""
    save_model, write_json = export_api.save_model, trial_export.write_json

    def saved(model: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        save_model(model, path, *args, **kwargs)
        reached("save")

    def written(path: Path, obj: Any) -> None:
        if Path(path).name == FINAL_CONFIG:
            reached("final_config")
        write_json(path, obj)

    export_api.save_model = saved
    trial_export.write_json = written


def main() -> None:
    torch.set_num_threads(1)
    wrap_writers()
    model = tiny_model()
    strategy: Any = "BinarySearch"
    if "--strategy" in sys.argv and sys.argv[sys.argv.index("--strategy") + 1] == "optuna":
        strategy = OptunaSearch(n_trials=10, seed=0)
    os.chdir(FOLDER)
    if os.environ.get("AMCT_TEST_READY"):
        (FOLDER / "ready").write_text("")
    result = amct.accuracy_based_auto_calibration(
        model, PausingEvaluator(model), "quant.json", "record.txt", "out/net", input_data(),
        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, strategy=strategy,
    )
    print(json.dumps({"final_plan": result.final_plan, "evaluations": result.evaluations,
                      "evaluations_this_run": result.evaluations_this_run}))


if __name__ == "__main__":
    main()
