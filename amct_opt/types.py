"""Plain values passed between the stages of a search.

Calibration produces :class:`LayerQuantFactors` per layer, the cost model a
:class:`LayerCost` per layer, the sensitivity pass a :class:`Ranking`; a
:data:`Plan` says which layers are quantized, and each evaluation of a plan is
an :class:`EvalResult`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError

__all__ = [
    "Plan",
    "LayerQuantFactors",
    "Record",
    "OutputRange",
    "OutputRanges",
    "LayerCost",
    "Ranking",
    "EvalResult",
]

#: layer qualified name -> True (INT8) / False (kept float).
Plan = Mapping[str, bool]


@dataclass(frozen=True)
class LayerQuantFactors:
    """Quantization factors of one layer, in the record file's terms.

    ``offset_d`` and ``offset_w`` are zero points in the int8 range [-128, 127];
    a real value ``x`` quantizes to ``clamp(round(x / scale) + offset)``.
    """

    scale_d: float
    offset_d: int
    scale_w: tuple[float, ...]
    offset_w: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale_d) and self.scale_d > 0):
            raise InputError(f"scale_d: must be a finite positive number, got {self.scale_d}")
        if len(self.scale_w) != len(self.offset_w) or not self.scale_w:
            raise InputError(
                f"scale_w/offset_w: must be non-empty and of equal length, got {len(self.scale_w)} and "
                f"{len(self.offset_w)}"
            )


#: layer qualified name -> its quantization factors.
Record = dict[str, LayerQuantFactors]


@dataclass(frozen=True)
class OutputRange:
    """The observed [lo, hi] of one layer's output (widened to include 0).

    The deploy export requantizes a quantized convolution's output with it where
    no following quantizer reads that output (see :mod:`amct_opt.export`).
    """

    lo: float
    hi: float

    def union(self, other: OutputRange) -> OutputRange:
        return OutputRange(min(self.lo, other.lo), max(self.hi, other.hi))


#: layer qualified name -> its observed output range.
OutputRanges = dict[str, OutputRange]


@dataclass(frozen=True)
class LayerCost:
    """Compute and size of one quantizable layer, measured from a real forward pass."""

    macs: int
    params: int


@dataclass(frozen=True)
class Ranking:
    """Per-layer sensitivity scores; a lower score means more sensitive."""

    scores: dict[str, float]

    def most_sensitive_first(self) -> list[str]:
        """Layer names sorted by ascending score (ties broken by name)."""
        return sorted(self.scores, key=lambda name: (self.scores[name], name))

    def as_pairs(self) -> list[list[Any]]:
        """``[[layer, score], ...]`` in ascending score, the reference's file form."""
        return [[name, self.scores[name]] for name in self.most_sensitive_first()]


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of a plan by the user's evaluator."""

    metric: Any
    ok: bool
    loss: float
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
