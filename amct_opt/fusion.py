"""Conv→BatchNorm folding, with the pairs found from the model's traced dataflow.

:func:`fusion_info` is what ``<prefix>_quant.json`` holds: which convolution each
BatchNorm was folded into, and which layers are quantized or kept float.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .config import QuantConfig
from .errors import InputError

__all__ = ["FusionPair", "find_conv_bn_pairs", "pairs_to_fold", "fold_conv_bn", "fusion_info"]

logger = logging.getLogger(__name__)

_CONV_BN = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}


@dataclass(frozen=True)
class FusionPair:
    """A convolution whose only consumer is a BatchNorm, folded into it."""

    conv: str
    bn: str


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def find_conv_bn_pairs(model: nn.Module) -> list[FusionPair]:
    """Conv→BN pairs read from a ``torch.fx`` trace of ``model``.

    A pair qualifies when the conv's output feeds the BN and nothing else, and
    each module is called exactly once.  A model that cannot be traced has no
    pairs (logged), unless it contains no BatchNorm at all.
    """
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not has_bn:
        return []
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any trace failure means "cannot fold safely"
        logger.warning("Conv+BN folding skipped: the model cannot be traced by torch.fx (%s)", exc)
        return []
    modules = dict(model.named_modules())
    counts = _call_counts(graph)
    pairs: list[FusionPair] = []
    for node in graph.nodes:
        if node.op != "call_module" or counts.get(str(node.target)) != 1:
            continue
        conv = modules.get(str(node.target))
        bn_type = _CONV_BN.get(type(conv))  # type: ignore[arg-type]
        if bn_type is None or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or counts.get(str(user.target)) != 1:
            continue
        bn = modules.get(str(user.target))
        if type(bn) is bn_type and bn.track_running_stats and bn.running_mean is not None:
            pairs.append(FusionPair(conv=str(node.target), bn=str(user.target)))
    return pairs


def pairs_to_fold(model: nn.Module, config: QuantConfig) -> list[FusionPair]:
    """The pairs of :func:`find_conv_bn_pairs` that ``config`` folds: none unless ``do_fusion``,
    and none whose convolution is in ``skip_fusion_layers``."""
    if not config.do_fusion:
        return []
    return [pair for pair in find_conv_bn_pairs(model) if pair.conv not in config.skip_fusion_layers]


def fusion_info(pairs: Sequence[FusionPair], plan: Mapping[str, bool], version: str) -> dict[str, Any]:
    """The JSON of ``<prefix>_quant.json``: each fold as ``{"layer": conv, "fused": [conv, bn]}``."""
    return {
        "version": version,
        "fusions": [{"layer": p.conv, "fused": [p.conv, p.bn]} for p in pairs],
        "quantized_layers": [name for name, on in plan.items() if on],
        "float_layers": [name for name, on in plan.items() if not on],
    }


@torch.no_grad()
def _fold(conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm) -> None:
    var = bn.running_var
    mean = bn.running_mean
    assert var is not None and mean is not None  # checked by fold_conv_bn
    gamma = bn.weight if bn.affine else torch.ones_like(var)
    beta = bn.bias if bn.affine else torch.zeros_like(var)
    factor = gamma / torch.sqrt(var + bn.eps)
    shape = [-1] + [1] * (conv.weight.dim() - 1)
    conv.weight.mul_(factor.reshape(shape).to(conv.weight.dtype))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    new_bias = (bias - mean) * factor + beta
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))


def fold_conv_bn(model: nn.Module, pairs: list[FusionPair]) -> nn.Module:
    """A deep copy of ``model`` in eval mode with each pair folded (BN → Identity)."""
    folded = copy.deepcopy(model).eval()
    for index, pair in enumerate(pairs):
        try:
            conv, bn = folded.get_submodule(pair.conv), folded.get_submodule(pair.bn)
        except AttributeError as exc:
            raise InputError(f"pairs[{index}]: {pair} names no module of the model ({exc})") from None
        if type(conv) not in _CONV_BN or type(bn) is not _CONV_BN[type(conv)] or bn.running_var is None:
            raise InputError(
                f"pairs[{index}]: expected Conv1d/2d/3d {pair.conv!r} and a BatchNorm with running "
                f"statistics {pair.bn!r} of the same dimension, got {type(conv).__name__} and {type(bn).__name__}"
            )
        _fold(conv, bn)  # type: ignore[arg-type]
        folded.set_submodule(pair.bn, nn.Identity())
    return folded
