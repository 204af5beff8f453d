"""INT8 quantize/dequantize math that matches ONNX QuantizeLinear/DequantizeLinear.

``q = saturate(round_half_to_even(x / scale) + zero_point)`` in [-128, 127];
``x_hat = (q - zero_point) * scale``.  Division (not multiplication by the
reciprocal) and ``torch.round`` (half to even) give the same results as ONNX
Runtime's kernels.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["QMIN", "QMAX", "quantize", "dequantize", "fake_quant", "fake_quant_per_channel", "range_params"]

QMIN = -128
QMAX = 127


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Quantize to int8 values (returned in ``x``'s float dtype)."""
    return torch.clamp(torch.round(x / scale) + zero_point, QMIN, QMAX)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Per-tensor quantize then dequantize; ``scale``/``zero_point`` are 0-d tensors."""
    return dequantize(quantize(x, scale, zero_point), scale, zero_point)


def fake_quant_per_channel(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int
) -> torch.Tensor:
    """Per-channel quantize then dequantize along ``axis``; ``scale`` is 1-d."""
    shape = [1] * w.dim()
    shape[axis] = -1
    return fake_quant(w, scale.reshape(shape), zero_point.reshape(shape))


def range_params(lo: float, hi: float) -> tuple[np.float32, int]:
    """Per-tensor int8 ``(scale, zero_point)`` over [lo, hi] widened to include 0: scale (hi - lo) / 255.

    The scale is then lowered by float32 ulps until ``scale * (127 - zp) <= hi``,
    so that the top of the range never passes ``hi`` (a Relu/Clip bounded by
    ``hi`` in front of the quantizer stays provably redundant).
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32(max((hi - lo) / (QMAX - QMIN), float(np.finfo(np.float32).tiny)))
    zero_point = int(np.clip(np.round(QMIN - lo / scale), QMIN, QMAX))
    while hi > 0 and scale * np.float32(QMAX - zero_point) > np.float32(hi):
        scale = np.nextafter(scale, np.float32(0))
    return np.float32(scale), zero_point
