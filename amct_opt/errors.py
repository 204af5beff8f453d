"""The package's exception hierarchy.

Every error raised on bad user input derives from :class:`AmctError`, and its
message names the argument or key path and what was expected.
"""

from __future__ import annotations

__all__ = [
    "AmctError",
    "ConfigError",
    "InputError",
    "EvaluatorError",
    "StrategyError",
    "StorageError",
    "CalibrationError",
    "ExportError",
    "UnsupportedModelError",
]


class AmctError(Exception):
    """Base class of every error amct_opt raises on purpose."""


class ConfigError(AmctError, ValueError):
    """A quant config file or field is missing, malformed or out of range."""


class InputError(AmctError, ValueError):
    """A function argument (path, tensor, names, axes) is not what was expected."""


class EvaluatorError(AmctError):
    """The user's evaluator is missing a method or returned something unusable."""


class StrategyError(AmctError, ValueError):
    """A strategy or sensitivity argument is unknown or of the wrong type."""


class StorageError(AmctError):
    """The study storage cannot be reached or holds an incompatible study."""


class CalibrationError(AmctError):
    """Calibration did not see enough data to compute quantization factors."""


class ExportError(AmctError):
    """An ONNX model could not be exported."""


class UnsupportedModelError(AmctError, ValueError):
    """The model has no quantizable layer, or uses a layer in a way not supported."""
