"""What a search strategy is: something that proposes plans and is told their results.

Two interfaces:

* :class:`AutoCalibrationStrategyBase`, the reference's: ``initialize(ranking)`` and
  ``update_quant_config(metric_eval_result) -> {"stop_flag", "roll_back_config"}``.
  A strategy written for the reference runs unchanged.
* :class:`SearchStrategy`, the ask/tell form the search loop drives.  A
  reference-style strategy is adapted to it by :class:`ReferenceStrategyAdapter`.

Strategies never touch torch, files or the study: the loop evaluates, stores
and answers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..types import EvalResult, LayerCost, Plan, Ranking

__all__ = [
    "AutoCalibrationStrategyBase",
    "SearchStrategy",
    "SearchContext",
    "Proposal",
    "ReferenceStrategyAdapter",
]


@dataclass(frozen=True)
class SearchContext:
    """What a strategy knows when the search starts.

    Attributes:
        layers: the searchable layers, most sensitive first.
        ranking: their sensitivity scores.
        costs: MACs and parameters per layer.
        objective: "macs", "params" or "layers".
        all_quant: the all-quantized plan's result (already evaluated).
        history: ``(plan, result)`` of every stored evaluation, oldest first.
    """

    layers: list[str]
    ranking: Ranking
    costs: Mapping[str, LayerCost]
    objective: str
    all_quant: EvalResult
    history: list[tuple[dict[str, bool], EvalResult]] = field(default_factory=list)


@dataclass(frozen=True)
class Proposal:
    """A plan to evaluate next; ``plan=None`` lets the study's sampler choose."""

    plan: dict[str, bool] | None
    source: str


class SearchStrategy(ABC):
    """The ask/tell interface the search loop drives."""

    #: Stop when the study holds this many evaluations (None: the strategy decides).
    n_trials: int | None = None
    #: Stop after this many seconds (None: no limit).
    timeout: float | None = None
    #: Where the study lives (None: ``amct_opt.db`` beside the outputs) and its name (None: the prefix).
    storage: Any = None
    study_name: str | None = None
    #: What "quantized share" weighs: "macs", "params" or "layers".
    objective: str = "macs"
    #: Two objectives (loss, quantized share) and a Pareto front instead of one.
    multi_objective: bool = False
    seed: int | None = None
    #: Log a line per evaluation.
    show_progress: bool = True
    #: Evaluations that may raise before the search gives up.
    max_failures: int = 3

    @abstractmethod
    def start(self, context: SearchContext) -> None:
        """Called once before the first :meth:`ask`."""

    @abstractmethod
    def ask(self) -> Proposal | None:
        """The next plan to evaluate, or None when the search is over."""

    @abstractmethod
    def tell(self, plan: Plan, result: EvalResult) -> None:
        """The result of a plan this strategy (or the sampler) proposed."""

    def final_plan(self) -> dict[str, bool] | None:
        """The strategy's chosen plan; None means "the best feasible stored trial"."""
        return None

    def observe(self, plan: Plan, result: EvalResult) -> None:
        """An evaluation stored by another worker of the study (not an answer to :meth:`ask`).

        A strategy whose state is a function of every stored evaluation records
        it; one that walks a fixed sequence of its own (BinarySearch) ignores it.
        """
        return None

    def finished(self) -> bool:
        """True when no further evaluation can change the result, given everything told and observed.

        The loop asks this (after :meth:`observe` of every stored evaluation)
        before it starts an evaluation, under the study's budget lock, so that a
        worker never evaluates after another worker has proven the search over.
        """
        return False

    def study_sampler(self) -> Any:
        """The Optuna sampler for the study (None: a constraint-aware default)."""
        return None


class AutoCalibrationStrategyBase(ABC):
    """The reference's strategy interface."""

    @abstractmethod
    def initialize(self, ranking: dict[str, float]) -> None:
        """Receive ``{layer: sensitivity score}``; lower scores are more sensitive."""

    @abstractmethod
    def update_quant_config(self, metric_eval_result: tuple[bool, float]) -> dict[str, Any]:
        """Given the last config's ``(ok, loss)``, return
        ``{"stop_flag": bool, "roll_back_config": {layer: keep_quantized}}``.

        The first call receives the all-quantized model's result.  When
        ``stop_flag`` is true, ``roll_back_config`` is the final config (or None
        when no quantized config met the target).
        """


def check_study_location(storage: Any, study_name: Any) -> None:
    """Raise :class:`StrategyError` unless ``storage`` is a URL/Optuna storage/None and ``study_name`` a name/None."""
    import optuna

    from ..errors import StrategyError

    if storage is not None and not isinstance(storage, (str, optuna.storages.BaseStorage)):
        raise StrategyError(f"storage: expected a SQLAlchemy URL or an optuna storage, got {storage!r}")
    if study_name is not None and (not isinstance(study_name, str) or not study_name):
        raise StrategyError(f"study_name: expected a non-empty string, got {study_name!r}")


class ReferenceStrategyAdapter(SearchStrategy):
    """Drives an :class:`AutoCalibrationStrategyBase` through ask/tell."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        # A reference strategy may say where its study lives and whether to log progress,
        # as BinarySearch(storage=..., show_progress=...) does.
        self.storage = getattr(strategy, "storage", None)
        self.study_name = getattr(strategy, "study_name", None)
        self.show_progress = bool(getattr(strategy, "show_progress", True))
        self._last: tuple[bool, float] | None = None
        self._layers: list[str] = []
        self._final: dict[str, bool] | None = None
        self._done = False

    def start(self, context: SearchContext) -> None:
        self._layers = list(context.layers)
        self.strategy.initialize(dict(context.ranking.scores))
        self._last = (context.all_quant.ok, context.all_quant.loss)

    def _full(self, config: Mapping[str, Any] | None) -> dict[str, bool]:
        config = config or {}
        return {name: bool(config.get(name, True)) for name in self._layers}

    def ask(self) -> Proposal | None:
        if self._done:
            return None
        answer = self.strategy.update_quant_config(self._last)
        if not isinstance(answer, Mapping) or "stop_flag" not in answer:
            from ..errors import StrategyError

            raise StrategyError(
                f"strategy: {type(self.strategy).__name__}.update_quant_config must return "
                f'{{"stop_flag": bool, "roll_back_config": {{layer: bool}}}}, got {answer!r}'
            )
        config = answer.get("roll_back_config")
        if answer["stop_flag"]:
            self._done = True
            self._final = self._full(config) if config is not None else dict.fromkeys(self._layers, False)
            return None
        return Proposal(self._full(config), source=type(self.strategy).__name__)

    def tell(self, plan: Plan, result: EvalResult) -> None:
        self._last = (result.ok, result.loss)

    def final_plan(self) -> dict[str, bool] | None:
        return self._final
