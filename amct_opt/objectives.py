"""How much of a model a plan quantizes: by MACs, parameter bytes or layer count."""

from __future__ import annotations

from collections.abc import Mapping

from .errors import StrategyError
from .types import LayerCost, Plan

__all__ = ["OBJECTIVES", "quantized_share", "check_objective"]

OBJECTIVES = ("macs", "params", "layers")


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise StrategyError(f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")
    return objective


def _weight(cost: LayerCost, objective: str) -> float:
    if objective == "macs":
        return float(cost.macs)
    if objective == "params":
        return float(cost.params)
    return 1.0


def quantized_share(plan: Plan, costs: Mapping[str, LayerCost], objective: str = "macs") -> float:
    """The share, in [0, 1], of the layers' total weight that ``plan`` quantizes."""
    total = sum(_weight(cost, objective) for cost in costs.values())
    if total <= 0:
        return 0.0
    done = sum(_weight(costs[name], objective) for name, on in plan.items() if on and name in costs)
    return done / total
