"""A torch-free evaluator for strategy tests: an additive loss landscape with a target.

The loss of a plan is the sum of its quantized layers' losses; a plan is ok
when that stays below ``target``.  Every ``evaluate`` call is recorded, so a
test counts real evaluations per config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna

from amct_opt.progress import SearchProgress
from amct_opt.search_loop import SearchLoop
from amct_opt.strategies.base import Proposal, SearchContext, SearchStrategy
from amct_opt.trials import SearchStudy
from amct_opt.types import EvalResult, LayerCost, Plan, Ranking

BASE_METRIC = 1.0


@dataclass
class Landscape:
    """Per-layer losses and MACs; ``calls`` holds every evaluated plan as a tuple of bools."""

    losses: dict[str, float]
    macs: dict[str, int]
    target: float
    calls: list[tuple[bool, ...]] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return list(self.losses)

    @property
    def costs(self) -> dict[str, LayerCost]:
        return {name: LayerCost(self.macs[name], self.macs[name] // 10) for name in self.layers}

    @property
    def ranking(self) -> Ranking:
        """Exact sensitivity: a layer with a larger loss scores lower."""
        return Ranking({name: 1.0 / (1.0 + loss) for name, loss in self.losses.items()})

    def loss(self, plan: Plan) -> float:
        return sum(loss for name, loss in self.losses.items() if plan[name])

    def judge(self, metric: float) -> tuple[bool, float]:
        loss = BASE_METRIC - metric
        return loss < self.target, loss

    def evaluate(self, plan: Plan) -> EvalResult:
        self.calls.append(tuple(bool(plan[name]) for name in self.layers))
        metric = BASE_METRIC - self.loss(plan)
        return EvalResult(metric, *self.judge(metric))

    def context(self, all_quant: EvalResult, history: list | None = None) -> SearchContext:
        ranking = self.ranking
        return SearchContext(ranking.most_sensitive_first(), ranking, self.costs, "macs", all_quant, history or [])


def make_landscape(n: int = 8, seed: int = 0, target_share: float = 0.45) -> Landscape:
    """A random landscape whose all-quantized config misses the target."""
    import random

    rng = random.Random(seed)
    losses = {f"layer{i}": round(rng.lognormvariate(0.0, 1.0), 4) for i in range(n)}
    macs = {f"layer{i}": int(10 ** rng.uniform(4, 6)) for i in range(n)}
    return Landscape(losses, macs, target_share * sum(losses.values()))


@dataclass
class Run:
    study: SearchStudy
    loop: SearchLoop
    stop_reason: str


def run_strategy(
    landscape: Landscape,
    strategy: SearchStrategy,
    storage: optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
) -> Run:
    """Run ``strategy`` through the product's SearchLoop on a (by default in-memory) study."""
    multi = strategy.multi_objective
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=["minimize", "maximize"] if multi else ["maximize"],
        sampler=strategy.study_sampler(),
        load_if_exists=True,
    )
    searched = SearchStudy(study, landscape.layers, landscape.costs, "macs", fingerprint="fake")
    loop = SearchLoop(
        searched, landscape.evaluate, landscape.judge, SearchProgress(False), fingerprint="fake", multi_objective=multi
    )
    answered = loop.answer(Proposal(dict.fromkeys(landscape.layers, True), "all_quant"))
    assert answered is not None
    history = [(r.plan, r.result) for r in searched.records(landscape.judge)]
    strategy.start(landscape.context(answered.result, history))
    outcome = loop.run(strategy)
    return Run(searched, loop, outcome.stop_reason)
