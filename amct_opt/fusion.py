"""Conv→BatchNorm folding, with the pairs found from the model's traced dataflow."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["FusionPair", "find_conv_bn_pairs", "fold_conv_bn"]

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


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    assert isinstance(conv, nn.modules.conv._ConvNd)
    var = bn.running_var
    mean = bn.running_mean
    assert var is not None and mean is not None
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
    for pair in pairs:
        conv = folded.get_submodule(pair.conv)
        bn = folded.get_submodule(pair.bn)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        _fold(conv, bn)
        folded.set_submodule(pair.bn, nn.Identity())
    return folded
