"""ONNX export of a :class:`~amct_opt.quant_model.QuantizedModel`.

Two models, as the reference writes them:

- ``<prefix>_fake_quant_model.onnx``: float weights and activations, each quantizer
  as Div/Round/Clip/Mul, exactly where the torch fake quant is; ONNX Runtime
  reproduces the torch outputs on any CPU.
- ``<prefix>_deploy_model.onnx``: standard QDQ int8 ONNX that ONNX Runtime's CPU
  provider runs as integer kernels (QLinearConv, QGemm, MatMulIntegerToFloat ...).
"""

from ._api import (
    ExportedModels,
    export_deploy_model,
    export_fake_quant_model,
    export_float_model,
    export_models,
)
from ._names import check_dynamic_axes

__all__ = [
    "ExportedModels",
    "check_dynamic_axes",
    "export_deploy_model",
    "export_fake_quant_model",
    "export_float_model",
    "export_models",
]
