"""amct_opt: accuracy-driven post-training INT8 quantization for PyTorch, with an AMCT-style API.

Example::

    import amct_opt as amct

    amct.create_quant_config("tmp/config.json", model, input_data, batch_num=2)
    result = amct.accuracy_based_auto_calibration(
        model, evaluator, "tmp/config.json", "tmp/scale_offset_record.txt",
        "results/model", input_data, strategy="optuna")
"""

__version__ = "0.1.0"

from .auto_calibration import AutoCalibrationResult, accuracy_based_auto_calibration
from .create_config import create_quant_config
from .errors import (
    AmctError,
    CalibrationError,
    ConfigError,
    EvaluatorError,
    ExportError,
    InputError,
    StorageError,
    StrategyError,
    UnsupportedModelError,
)
from .evaluator import AutoCalibrationEvaluatorBase
from .manual import quantize_model, save_model
from .sensitivity import CosineSimilarity, KLSensitivity, MseSensitivity, SensitivityBase

__all__ = [
    "__version__",
    "accuracy_based_auto_calibration",
    "AutoCalibrationResult",
    "AutoCalibrationEvaluatorBase",
    "create_quant_config",
    "quantize_model",
    "save_model",
    "SensitivityBase",
    "CosineSimilarity",
    "MseSensitivity",
    "KLSensitivity",
    "AmctError",
    "CalibrationError",
    "ConfigError",
    "EvaluatorError",
    "ExportError",
    "InputError",
    "StorageError",
    "StrategyError",
    "UnsupportedModelError",
]
