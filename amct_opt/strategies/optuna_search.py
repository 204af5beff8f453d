"""``strategy="optuna"``: every layer's decision is a search dimension; Optuna's samplers propose.

The search spends the user's evaluations in four ways, all through ask/tell:

1. a warm start: the all-quantized config, then the roll-back prefixes that
   BinarySearch visits over the sensitivity ranking, so that it never ends
   below BinarySearch;
2. a ranking-informed additive loss model (:mod:`._loss_model`): the ranking
   is its prior, every evaluation refines it, and it proposes the untried
   config with the largest expected gain in quantized share;
3. neighbours of the best feasible config (one more layer quantized, least
   sensitive and largest first) when the model has nothing to propose;
4. the sampler (TPE by default; any ``optuna.samplers.BaseSampler``), which
   sees every trial and its feasibility constraint; it gets every
   ``SAMPLER_EVERY``-th proposal after the warm start, and all of them once
   phases 2 and 3 run dry.

The search goes on after the first feasible config until the budget
(``n_trials`` evaluations in the study, or ``timeout`` seconds) is spent, and
stops early once no untried config could quantize more than the best feasible
one (the optimum is then proven).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import optuna

from ..errors import StrategyError
from ..objectives import OBJECTIVES
from ..types import EvalResult, LayerCost, Plan
from ._loss_model import LossModel
from .base import Proposal, SearchContext, SearchStrategy, check_study_location
from .binary_search import BinarySearch

__all__ = ["SAMPLER_NAMES", "OptunaSearch", "make_sampler"]

SAMPLER_NAMES = ("tpe", "gp", "nsga2", "random", "qmc", "bruteforce")
#: After the warm start, every SAMPLER_EVERY-th proposal is the sampler's.
SAMPLER_EVERY = 6

logger = logging.getLogger(__name__)


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """A sampler by name; TPE, GP and NSGA-II read the trials' feasibility constraint."""
    factories: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=8),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
        "bruteforce": lambda: optuna.samplers.BruteForceSampler(seed=seed),
    }
    if name not in factories:
        raise StrategyError(f"sampler: unknown name {name!r}; expected one of {list(SAMPLER_NAMES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return factories[name]()


def _check_positive(value: Any, argument: str, kinds: tuple[type, ...], expected: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, kinds) or float(cast(float, value)) <= 0:
        raise StrategyError(f"{argument}: expected a positive {expected} or None, got {value!r}")


class OptunaSearch(SearchStrategy):
    """Search per-layer INT8/float decisions with an Optuna sampler in a persistent study.

    Args:
        sampler: an ``optuna.samplers.BaseSampler`` or one of "tpe", "gp",
            "nsga2", "random", "qmc", "bruteforce" (default "tpe"; "nsga2" when
            ``multi_objective``).
        n_trials: stop when the study holds this many evaluations (default:
            twice BinarySearch's bound, ``2 * (floor(log2 n) + 2) + 1``).
        timeout: stop after this many seconds of this run.
        storage: a SQLAlchemy URL or an Optuna storage (default: ``amct_opt.db``
            beside the outputs).
        study_name: default: the output prefix.
        seed: seeds the sampler and the loss model's draws, so that a search is reproducible.
        objective: what the quantized share weighs: "macs", "params" or "layers".
        multi_objective: minimize loss and maximize the share; the study keeps a Pareto front.
        warm_start: begin with BinarySearch's configs.
        guided: between the sampler's proposals, propose configs from the
            ranking-informed loss model and neighbours of the best one; when
            False, the sampler proposes everything after the warm start.
        show_progress: log a line per evaluation.
        max_failures: evaluations that may raise before the search gives up.
    """

    def __init__(
        self,
        sampler: optuna.samplers.BaseSampler | str | None = None,
        n_trials: int | None = None,
        timeout: float | None = None,
        storage: Any = None,
        study_name: str | None = None,
        seed: int | None = None,
        objective: str = "macs",
        multi_objective: bool = False,
        warm_start: bool = True,
        guided: bool = True,
        show_progress: bool = True,
        max_failures: int = 3,
    ) -> None:
        if sampler is not None and not isinstance(sampler, (str, optuna.samplers.BaseSampler)):
            raise StrategyError(
                f"sampler: expected an optuna.samplers.BaseSampler or a name in {list(SAMPLER_NAMES)}, "
                f"got {type(sampler).__name__}"
            )
        if isinstance(sampler, str) and sampler not in SAMPLER_NAMES:
            raise StrategyError(f"sampler: unknown name {sampler!r}; expected one of {list(SAMPLER_NAMES)}")
        _check_positive(n_trials, "n_trials", (int,), "int")
        _check_positive(timeout, "timeout", (int, float), "number of seconds")
        if objective not in OBJECTIVES:
            raise StrategyError(f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")
        check_study_location(storage, study_name)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise StrategyError(f"seed: expected an int or None, got {seed!r}")
        if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
            raise StrategyError(f"max_failures: expected an int >= 0, got {max_failures!r}")
        self.sampler = sampler
        self.n_trials = n_trials
        self._n_trials_given = n_trials
        self.timeout = timeout
        self.storage = storage
        self.study_name = study_name
        self.seed = seed
        self.objective = objective
        self.multi_objective = bool(multi_objective)
        self.warm_start = bool(warm_start)
        self.guided = bool(guided)
        self.show_progress = bool(show_progress)
        self.max_failures = max_failures
        self._sampler: optuna.samplers.BaseSampler | None = None
        self._context: SearchContext | None = None
        self._binary: BinarySearch | None = None
        self._last: tuple[bool, float] = (False, 0.0)
        self._weights: dict[str, float] = {}
        self._model: LossModel | None = None
        self._incumbent: tuple[bool, ...] | None = None
        self._incumbent_share = -1.0
        self._tried: set[tuple[bool, ...]] = set()
        self._turn = 0

    # -- study wiring ------------------------------------------------------
    def study_sampler(self) -> optuna.samplers.BaseSampler:
        if self._sampler is None:
            if isinstance(self.sampler, optuna.samplers.BaseSampler):
                self._sampler = self.sampler
            else:
                default = "nsga2" if self.multi_objective else "tpe"
                self._sampler = make_sampler(self.sampler or default, self.seed)
        return self._sampler

    @staticmethod
    def default_budget(n_layers: int) -> int:
        """Twice BinarySearch's bound (floor(log2 n) + 2), plus the all-quantized config."""
        return 2 * (int(math.log2(max(n_layers, 1))) + 2) + 1

    # -- ask / tell --------------------------------------------------------
    def start(self, context: SearchContext) -> None:
        self._context = context
        if self._n_trials_given is None and self.timeout is None:
            self.n_trials = self.default_budget(len(context.layers))
        self._binary, self._incumbent, self._incumbent_share = None, None, -1.0
        self._tried, self._turn = set(), 0
        self._weights = {name: _weight(context.costs[name], self.objective) for name in context.layers}
        self._model = LossModel(context.layers, self._weights, context.ranking.scores, self.seed)
        self._record(dict.fromkeys(context.layers, True), context.all_quant)
        for plan, result in context.history:
            self._record(plan, result)
        self._last = (context.all_quant.ok, context.all_quant.loss)
        if self.warm_start:
            self._binary = BinarySearch()
            self._binary.initialize(dict(context.ranking.scores))

    def _key(self, plan: Plan) -> tuple[bool, ...]:
        return tuple(bool(plan[name]) for name in self._weights)

    def _plan(self, key: tuple[bool, ...]) -> dict[str, bool]:
        return dict(zip(self._weights, key))

    def _share(self, key: tuple[bool, ...]) -> float:
        total = sum(self._weights.values()) or 1.0
        return sum(w for w, on in zip(self._weights.values(), key) if on) / total

    def _neighbour(self) -> tuple[bool, ...] | None:
        """The incumbent with one more layer quantized, least sensitive and largest first."""
        if self._incumbent is None or self._context is None:
            return None
        scores = self._context.ranking.scores
        names = list(self._weights)
        floats = [i for i, on in enumerate(self._incumbent) if not on]
        for i in sorted(floats, key=lambda i: (-scores[names[i]], -self._weights[names[i]], names[i])):
            key = tuple(on or j == i for j, on in enumerate(self._incumbent))
            if key not in self._tried:
                return key
        return None

    def optimum_proven(self) -> bool:
        """True when every config that quantizes more than the best feasible one has been evaluated."""
        if self._incumbent is None:
            return False
        weights = list(self._weights.values())
        order = sorted(range(len(weights)), key=lambda i: -weights[i])
        floor = sum(w for w, on in zip(weights, self._incumbent) if on) * (1 + 1e-12)
        rest = [sum(weights[i] for i in order[k:]) for k in range(len(order) + 1)]
        # Depth-first over the layers, largest first, pruning branches that cannot beat the floor;
        # it stops at the first untried config above the floor, so it visits few leaves.
        stack: list[tuple[int, float, tuple[bool, ...]]] = [(0, 0.0, ())]
        while stack:
            depth, total, prefix = stack.pop()
            if total + rest[depth] <= floor:
                continue
            if depth == len(order):
                key = [False] * len(weights)
                for index, on in zip(order, prefix):
                    key[index] = on
                if tuple(key) not in self._tried:
                    return False
                continue
            stack.append((depth + 1, total, (*prefix, False)))
            stack.append((depth + 1, total + weights[order[depth]], (*prefix, True)))
        return True

    def ask(self) -> Proposal | None:
        if self._binary is not None:
            answer = self._binary.update_quant_config(self._last)
            if not answer["stop_flag"]:
                return Proposal(dict(answer["roll_back_config"]), "warm_start:binary_search")
            self._binary = None
        if not self.multi_objective and self.optimum_proven():
            logger.info("every config that quantizes more than the best feasible one is evaluated: optimum proven")
            return None
        self._turn += 1
        if self.guided and self._turn % SAMPLER_EVERY:
            key = None if self._model is None else self._model.propose(self._tried, self._incumbent_share)
            if key is not None:
                return Proposal(self._plan(key), "loss_model")
            key = self._neighbour()
            if key is not None:
                return Proposal(self._plan(key), "ranking_neighbour")
        return Proposal(None, "sampler")

    def tell(self, plan: Plan, result: EvalResult) -> None:
        self._last = (result.ok, result.loss)
        self._record(plan, result)

    def observe(self, plan: Plan, result: EvalResult) -> None:
        if self._key(plan) not in self._tried:  # the start's history may hold it already
            self._record(plan, result)

    def finished(self) -> bool:
        return not self.multi_objective and self.optimum_proven()

    def _record(self, plan: Plan, result: EvalResult) -> None:
        key = self._key(plan)
        self._tried.add(key)
        if self._model is not None:
            self._model.add(key, result.loss, result.ok)
        share = self._share(key)
        if result.ok and share > self._incumbent_share:
            self._incumbent, self._incumbent_share = key, share


def _weight(cost: LayerCost, objective: str) -> float:
    return float(cost.macs if objective == "macs" else cost.params if objective == "params" else 1)
