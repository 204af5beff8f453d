"""The MNIST evaluator for ``accuracy_based_auto_calibration``.

Two metrics, both on the 1,000 test digits and both "higher is better":

- ``"kl"`` (default): minus the mean KL divergence from the fp32 model's
  predicted distribution to the model's. The float model scores 0; every INT8
  error costs something, so the drop measures what quantization did.
- ``"log-likelihood"``: the mean log-likelihood of the true class. On this
  classifier INT8 moves it by a few 1e-4 nats, up or down: the rounding errors
  shift many digits' log-probabilities a little, and their mean over 1,000 digits
  has a standard error (about 4e-4) several times larger than INT8's systematic
  cost (the mean KL, about 7e-5). A target on it selects on that scatter.

``Scores`` reports all three numbers (and top-1) whichever metric drives the search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

import amct_opt as amct
from mnist_data import MnistSplit

__all__ = ["DEFAULT_TARGETS", "METRICS", "SEVEN_BIT_TARGETS", "MnistEvaluator", "Scores", "log_probs"]

METRICS = ("kl", "log-likelihood")
#: Largest accepted drop of each metric, in nats. All-INT8 costs the bundled
#: model a mean KL of about 1.0e-4, so the default target needs some layers in float.
DEFAULT_TARGETS = {"kl": 5e-5, "log-likelihood": 5e-4}
#: The same for 7-bit convolution weights (CPUs without VNNI), where all-INT8 costs
#: a mean KL of about 1.1e-4.
SEVEN_BIT_TARGETS = {"kl": 5.5e-5, "log-likelihood": 5e-4}


@dataclass(frozen=True)
class Scores:
    """Mean log-likelihood of the true class, top-1, and mean KL(fp32 || model)."""

    log_likelihood: float
    top1: float
    kl: float

    def __str__(self) -> str:
        return f"KL to fp32 {self.kl:.2e}, log-likelihood {self.log_likelihood:.5f}, top-1 {self.top1:.2%}"


@torch.no_grad()
def log_probs(
    predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 100
) -> torch.Tensor:
    """Log-softmax of ``predict`` (images -> logits: a model, or an ORT session wrapper) on ``x``."""
    batches = [predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return F.log_softmax(torch.cat(batches), dim=1)


class MnistEvaluator(amct.AutoCalibrationEvaluatorBase):
    """Calibrates on the train split, evaluates on the test split.

    ``metric_eval`` accepts a config whose metric dropped by less than ``target``
    nats (default: ``DEFAULT_TARGETS[metric]``).
    """

    def __init__(
        self,
        float_model: nn.Module,
        data: MnistSplit,
        batch_num: int,
        metric: str = "kl",
        target: float | None = None,
        batch_size: int = 64,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if batch_num * batch_size > len(data.train_x):
            raise ValueError(f"batch_num * batch_size = {batch_num * batch_size} exceeds the train split")
        self.data = data
        self.batch_num = batch_num
        self.batch_size = batch_size
        self.metric = metric
        self.target = DEFAULT_TARGETS[metric] if target is None else target
        self.reference = log_probs(float_model.eval(), data.test_x)

    def scores(self, predict: Callable[[torch.Tensor], torch.Tensor]) -> Scores:
        """All scores of ``predict`` on the test split."""
        lp = log_probs(predict, self.data.test_x)
        labels = self.data.test_y[:, None]
        return Scores(
            log_likelihood=float(lp.gather(1, labels).mean()),
            top1=float((lp.argmax(1) == self.data.test_y).float().mean()),
            kl=float((self.reference.exp() * (self.reference - lp)).sum(1).mean()),
        )

    @torch.no_grad()
    def calibration(self, model: nn.Module) -> None:
        """Run ``batch_num`` train batches through ``model``."""
        model.eval()
        for i in range(self.batch_num):
            model(self.data.train_x[i * self.batch_size : (i + 1) * self.batch_size])

    def evaluate(self, model: nn.Module) -> float:
        """``-KL`` or the true-class log-likelihood on the test split (higher is better)."""
        scores = self.scores(model.eval())
        return 0.0 - scores.kl if self.metric == "kl" else scores.log_likelihood  # 0.0 - x: no "-0"

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        """``(loss < target, loss)`` with ``loss = original - new``."""
        loss = original_metric - new_metric
        return loss < self.target, loss
