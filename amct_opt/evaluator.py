"""The user's evaluator: its base class, and a wrapper that validates what it returns."""

from __future__ import annotations

import math
import numbers
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from .errors import EvaluatorError
from .types import EvalResult

__all__ = ["AutoCalibrationEvaluatorBase", "EvaluatorRunner", "check_evaluator"]

_METHODS = ("calibration", "evaluate", "metric_eval")


class AutoCalibrationEvaluatorBase(ABC):
    """What :func:`amct_opt.accuracy_based_auto_calibration` needs from the user.

    Example::

        class Evaluator(AutoCalibrationEvaluatorBase):
            def calibration(self, model):
                for x in calib_batches[:batch_num]:
                    model(x)
            def evaluate(self, model):
                return top1(model, test_set)
            def metric_eval(self, original_metric, new_metric):
                loss = original_metric - new_metric
                return loss * 100 < 0.5, loss
    """

    @abstractmethod
    def calibration(self, model: torch.nn.Module) -> None:
        """Run at least ``batch_num`` forward batches through ``model``."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module) -> Any:
        """Return the model's metric (a real number)."""

    @abstractmethod
    def metric_eval(self, original_metric: Any, new_metric: Any) -> tuple[bool, float]:
        """Return ``(target met, loss)`` for ``new_metric`` against ``original_metric``."""


def check_evaluator(evaluator: object) -> None:
    """Raise :class:`EvaluatorError` unless ``evaluator`` has the three callables."""
    missing = [m for m in _METHODS if not callable(getattr(evaluator, m, None))]
    if missing:
        raise EvaluatorError(
            f"model_evaluator: {type(evaluator).__name__} lacks method(s) {missing}; expected an "
            "AutoCalibrationEvaluatorBase with calibration(model), evaluate(model) and "
            "metric_eval(original_metric, new_metric)"
        )


def _as_metric(value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EvaluatorError(
            f"model_evaluator.evaluate: expected a real number, got {type(value).__name__} {value!r}"
        )
    metric = float(value)
    if not math.isfinite(metric):
        raise EvaluatorError(f"model_evaluator.evaluate: expected a finite number, got {metric}")
    return metric


class EvaluatorRunner:
    """Calls the user's evaluator, validates its answers and counts the calls."""

    def __init__(self, evaluator: object) -> None:
        check_evaluator(evaluator)
        self.evaluator: Any = evaluator
        self.evaluate_calls = 0
        self.calibration_calls = 0

    def calibrate(self, model: torch.nn.Module) -> None:
        self.calibration_calls += 1
        self.evaluator.calibration(model)

    def metric(self, model: torch.nn.Module) -> float:
        self.evaluate_calls += 1
        with torch.no_grad():
            return _as_metric(self.evaluator.evaluate(model))

    def judge(self, original: float, new: float) -> tuple[bool, float]:
        answer = self.evaluator.metric_eval(original, new)
        if not (isinstance(answer, (tuple, list)) and len(answer) == 2):
            raise EvaluatorError(
                "model_evaluator.metric_eval: expected a pair (ok: bool, loss: float), "
                f"got {answer!r}"
            )
        ok, loss = answer
        if isinstance(ok, torch.Tensor):
            ok = bool(ok.item())
        if not isinstance(ok, (bool, numbers.Integral)):
            raise EvaluatorError(f"model_evaluator.metric_eval: ok must be a bool, got {ok!r}")
        try:
            loss_f = float(loss)
        except (TypeError, ValueError):
            raise EvaluatorError(f"model_evaluator.metric_eval: loss must be a number, got {loss!r}") from None
        if math.isnan(loss_f):
            raise EvaluatorError("model_evaluator.metric_eval: loss is NaN")
        return bool(ok), loss_f

    def evaluate(self, model: torch.nn.Module, original: float) -> EvalResult:
        """Evaluate ``model`` and judge it against ``original``."""
        start = time.perf_counter()
        metric = self.metric(model)
        ok, loss = self.judge(original, metric)
        return EvalResult(metric=metric, ok=ok, loss=loss, duration_s=time.perf_counter() - start)
