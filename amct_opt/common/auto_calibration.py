"""The reference's import path for the evaluator base class."""

from ..evaluator import AutoCalibrationEvaluatorBase

__all__ = ["AutoCalibrationEvaluatorBase"]
