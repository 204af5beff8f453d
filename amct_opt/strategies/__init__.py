"""Search strategies: the reference's BinarySearch and Optuna's samplers."""

from __future__ import annotations

from typing import Any

from ..errors import StrategyError
from .base import (
    AutoCalibrationStrategyBase,
    Proposal,
    ReferenceStrategyAdapter,
    SearchContext,
    SearchStrategy,
)
from .binary_search import BinarySearch
from .optuna_search import OptunaSearch

__all__ = [
    "AutoCalibrationStrategyBase",
    "BinarySearch",
    "OptunaSearch",
    "Proposal",
    "SearchContext",
    "SearchStrategy",
    "resolve_strategy",
]


def resolve_strategy(strategy: Any) -> SearchStrategy:
    """A strategy name ("BinarySearch", "optuna") or instance, as a :class:`SearchStrategy`."""
    if isinstance(strategy, SearchStrategy):
        return strategy
    if isinstance(strategy, str):
        key = strategy.lower()
        if key in ("binarysearch", "binary_search", "binary"):
            return ReferenceStrategyAdapter(BinarySearch())
        if key == "optuna":
            return OptunaSearch()
        raise StrategyError(
            f"strategy: unknown name {strategy!r}; expected 'BinarySearch', 'optuna' or an instance"
        )
    if isinstance(strategy, AutoCalibrationStrategyBase) or (
        callable(getattr(strategy, "initialize", None))
        and callable(getattr(strategy, "update_quant_config", None))
    ):
        return ReferenceStrategyAdapter(strategy)
    raise StrategyError(
        "strategy: expected 'BinarySearch', 'optuna', a SearchStrategy or an "
        f"AutoCalibrationStrategyBase instance, got {type(strategy).__name__}"
    )
