"""Per-layer sensitivity to quantization, scored in one pass over the calibration batches.

Each layer's float input (from the float model) is fed through the float layer
and through its fake-quant version; ``compare`` scores the two outputs.  A
lower score means a more sensitive layer.  Only one layer output is alive at a
time, and nothing is written to disk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from .errors import StrategyError
from .quant_model import QuantizedModel
from .types import Ranking

__all__ = [
    "SensitivityBase",
    "CosineSimilarity",
    "MseSensitivity",
    "KLSensitivity",
    "resolve_sensitivity",
    "score_layers",
]


class SensitivityBase(ABC):
    """Scores how much quantization changes a layer's output; lower means more sensitive."""

    @abstractmethod
    def compare(self, float_out: torch.Tensor, quant_out: torch.Tensor) -> float:
        """Score one batch; the layer's score is the mean over batches."""


class CosineSimilarity(SensitivityBase):
    """The reference's: ``0.5 + 0.5 * cos(float_out, quant_out)``, in [0, 1]."""

    def compare(self, float_out: torch.Tensor, quant_out: torch.Tensor) -> float:
        a = float_out.detach().double().flatten()
        b = quant_out.detach().double().flatten()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12)
        return float(0.5 + 0.5 * cos)


class MseSensitivity(SensitivityBase):
    """``1 / (1 + MSE / mean(float_out**2))``: 1 for identical outputs, towards 0 when far apart."""

    def compare(self, float_out: torch.Tensor, quant_out: torch.Tensor) -> float:
        a = float_out.detach().double()
        mse = torch.mean((a - quant_out.detach().double()) ** 2)
        power = torch.mean(a**2).clamp_min(1e-12)
        return float(1.0 / (1.0 + mse / power))


class KLSensitivity(SensitivityBase):
    """``exp(-KL(softmax(float) || softmax(quant)))`` over each sample's flattened output."""

    def compare(self, float_out: torch.Tensor, quant_out: torch.Tensor) -> float:
        batch = float_out.shape[0] if float_out.dim() > 1 else 1
        p = torch.log_softmax(float_out.detach().double().reshape(batch, -1), dim=1)
        q = torch.log_softmax(quant_out.detach().double().reshape(batch, -1), dim=1)
        kl = torch.sum(p.exp() * (p - q), dim=1).mean()
        return float(torch.exp(-kl.clamp_min(0.0)))


_BUILTIN: dict[str, type[SensitivityBase]] = {
    "CosineSimilarity": CosineSimilarity,
    "MSE": MseSensitivity,
    "MseSensitivity": MseSensitivity,
    "KL": KLSensitivity,
    "KLSensitivity": KLSensitivity,
}


def resolve_sensitivity(sensitivity: str | SensitivityBase) -> SensitivityBase:
    """The string name of a built-in, or an instance of :class:`SensitivityBase`."""
    if isinstance(sensitivity, SensitivityBase):
        return sensitivity
    if isinstance(sensitivity, str):
        if sensitivity in _BUILTIN:
            return _BUILTIN[sensitivity]()
        raise StrategyError(
            f"sensitivity: unknown name {sensitivity!r}; expected one of {sorted(_BUILTIN)} "
            "or a SensitivityBase instance"
        )
    raise StrategyError(
        f"sensitivity: expected a name or a SensitivityBase instance, got {type(sensitivity).__name__}"
    )


def score_layers(
    qmodel: QuantizedModel,
    run_calibration: Callable[[torch.nn.Module], Any],
    sensitivity: SensitivityBase,
    layers: list[str] | None = None,
) -> Ranking:
    """Score ``layers`` (default: all) in one run of ``run_calibration`` on the float model."""
    names = layers if layers is not None else qmodel.layer_names
    saved = qmodel.plan
    qmodel.set_all(False)
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        layer = qmodel.layer(name)

        def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, name: str = name) -> None:
            quant_out = mod.quant_forward(*args, **kwargs)
            sums[name] += float(sensitivity.compare(out, quant_out))
            counts[name] += 1

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run_calibration(qmodel)
    finally:
        for handle in handles:
            handle.remove()
        qmodel.set_plan(saved)
    missing = [name for name in names if counts[name] == 0]
    if missing:
        raise StrategyError(f"sensitivity: layers {missing} never ran during calibration()")
    return Ranking({name: sums[name] / counts[name] for name in names})
