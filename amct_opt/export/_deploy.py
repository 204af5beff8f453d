"""From the traced graph to the two ONNX models: fake-quant and int8 deploy."""

from __future__ import annotations

import logging

import onnx

from ._deploy_activations import (
    activations_to_uint8,
    add_simulated_requantizers,
    requantize_conv_outputs,
    share_activation_quantizers,
)
from ._deploy_float_kernels import float_kernels_for_unfused_layers
from ._deploy_weights import fold_weight_quantizers, fold_weight_transposes, quantize_biases, static_tensors
from ._fake_quant import simulate_quantizers
from ._graph import Graph
from ._markers import strip_markers

__all__ = ["to_deploy_model", "to_fake_quant_model"]

logger = logging.getLogger(__name__)


def to_fake_quant_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float weights, fake quantization exactly where the torch fake quant is (edited in place).

    That includes the output requantizers the torch layers simulate (see :mod:`amct_opt.requant`).

    Weight and activation quantizers are written as Div/Round/Clip/Mul, so that
    ORT computes them in float instead of fusing them into integer kernels
    (QLinearConv, MatMulNBits ...; see :mod:`._fake_quant`).
    """
    graph = Graph(model)
    outputs = strip_markers(graph)
    graph.commit()
    graph = Graph(model)
    add_simulated_requantizers(graph, outputs)
    simulate_quantizers(graph)
    graph.commit()
    return model


def to_deploy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The int8 deploy form of a traced model (edited in place).

    Weights become int8 initializers + DequantizeLinear (transposes folded in),
    biases int32 + DequantizeLinear where ORT's integer kernels take them, identical
    activation quantizers are shared, every quantized Conv gets an output
    QuantizeLinear so that ORT runs it as QLinearConv (unless a float layer reads
    it: then it, like every ConvTranspose, runs a float kernel on its constant
    dequantized weight), and activations are stored as uint8 (zero point + 128:
    the same real values).
    """
    graph = Graph(model)
    outputs = strip_markers(graph)
    graph.commit()
    static = static_tensors(model)
    graph = Graph(model)
    fold_weight_quantizers(graph)
    fold_weight_transposes(graph)
    share_activation_quantizers(graph)
    requantize_conv_outputs(graph, outputs)
    unfused = set(float_kernels_for_unfused_layers(graph))
    if unfused:
        names = [o.layer for o in outputs if o.tensor in unfused]
        logger.info(
            "deploy model: %d quantized layer(s) run with float kernels in ONNX Runtime, on their int8 input "
            "and weight values (no integer kernel for a ConvTranspose; a Conv whose output a layer kept float "
            "reads gets no output quantizer): %s", len(unfused), ", ".join(sorted(names)) or "?",
        )
    quantize_biases(graph, static)
    activations_to_uint8(graph)
    graph.commit()
    return model
