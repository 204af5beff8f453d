"""A tiny model, data and evaluator for the reliability tests (fast enough for subprocess runs).

Also the file checks those tests share: every JSON parses, every ONNX loads, no temp file is left.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import amct_opt as amct

#: The tiny model's all-INT8 loss is 2.35e-6; rolling back its 1, 2, 3, 4 most sensitive layers
#: gives 2.32e-6, 2.12e-6, 1.93e-6, 1.61e-6.  This target forces BinarySearch to roll back three.
ROLL_BACK_TARGET = 2.03e-6


class TinyNet(nn.Module):
    """Conv+BN, a strided conv, a depthwise conv and two Linear layers: five quantizable layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.down(x))
        x = x + torch.relu(self.dw(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


LAYERS = ["conv", "down", "dw", "fc1", "fc2"]


def tiny_model(seed: int = 0) -> TinyNet:
    """A TinyNet with deterministic weights and non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = TinyNet()
    model.train()
    with torch.no_grad():
        for x in tiny_batches(4, seed=seed + 100):
            model(x)
    return model.eval()


def tiny_batches(n: int, batch: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(n)]


class TinyEvaluator(amct.AutoCalibrationEvaluatorBase):
    """Metric: minus the mean squared distance to ``reference``'s outputs; ok when it moves less than ``target``.

    Counts calls, and remembers the plan of every ``evaluate`` that returned
    (``None`` for the float model), so tests can check that nothing is evaluated twice.
    """

    def __init__(self, reference: nn.Module, target: float = ROLL_BACK_TARGET, batch_num: int = 2) -> None:
        self.target = target
        self.batch_num = batch_num
        self.calib = tiny_batches(batch_num, seed=2)
        self.test_x = torch.cat(tiny_batches(4, seed=3))
        with torch.no_grad():
            self.test_y = reference(self.test_x)
        self.calibration_calls = 0
        self.evaluate_calls = 0
        self.evaluated: list[tuple[tuple[str, bool], ...] | None] = []

    def calibration(self, model: nn.Module) -> None:
        self.calibration_calls += 1
        for x in self.calib:
            model(x)

    def evaluate(self, model: nn.Module) -> Any:
        self.evaluate_calls += 1
        with torch.no_grad():
            metric = -float(((model(self.test_x) - self.test_y) ** 2).mean())
        plan = getattr(model, "plan", None)
        self.evaluated.append(None if plan is None else tuple(sorted(plan.items())))
        return metric

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        loss = abs(original_metric - new_metric)
        return loss < self.target, loss


def write_config(path: Path, model: nn.Module | None = None, batch_num: int = 2) -> Path:
    amct.create_quant_config(str(path), model or tiny_model(), tiny_batches(1)[0][:1], batch_num=batch_num)
    return path


def input_data() -> torch.Tensor:
    return tiny_batches(1)[0][:1]


def tree(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` (relative path -> size; -1 for a folder)."""
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1 for p in sorted(root.rglob("*"))}


def check_files_sound(root: Path) -> list[str]:
    """Problems with the files under ``root``: unparsable JSON, unloadable ONNX, temp files."""
    import onnx

    problems = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            problems.append(f"temp file left: {path}")
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                problems.append(f"bad JSON {path}: {exc}")
        elif path.suffix == ".onnx":
            try:
                onnx.checker.check_model(onnx.load(str(path)))
            except Exception as exc:  # noqa: BLE001 - any failure is a corrupt file
                problems.append(f"bad ONNX {path}: {exc}")
    return problems


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
