"""BinarySearch: the reference's semantics, checked on pure-Python fakes (no model, no torch).

The fake "model" needs its ``k`` most sensitive layers kept float to meet the
target: a plan is ok exactly when all of them are float.  The minimal passing
plan is then known for every ``k``, and so is the reference's ``mid`` sequence.
"""

from __future__ import annotations

import math

import optuna
import pytest

from amct_opt.errors import StrategyError
from amct_opt.progress import SearchProgress
from amct_opt.search_loop import SearchLoop
from amct_opt.strategies import BinarySearch, SearchContext, resolve_strategy
from amct_opt.strategies.base import Proposal, ReferenceStrategyAdapter
from amct_opt.trials import SearchStudy
from amct_opt.types import EvalResult, LayerCost, Plan, Ranking


def layer_names(n: int) -> list[str]:
    return [f"layer{i:02d}" for i in range(n)]


def ranking_for(n: int) -> dict[str, float]:
    """Scores deliberately not in name order: layer i has rank (i * 7) % n (n must be coprime with 7)."""
    assert n % 7, "the rank formula needs n coprime with 7"
    names = layer_names(n)
    return {name: 0.1 + ((i * 7) % n) / (10 * n) for i, name in enumerate(names)}


def most_sensitive_first(ranking: dict[str, float]) -> list[str]:
    return sorted(ranking, key=lambda name: ranking[name])


class NeedsFloat:
    """A fake evaluator: ok iff the ``k`` most sensitive layers are all float."""

    def __init__(self, order: list[str], k: int) -> None:
        self.critical = order[:k]
        self.plans: list[dict[str, bool]] = []

    def metric(self, plan: Plan) -> float:
        """Minus the number of critical layers still quantized."""
        return -float(sum(plan[name] for name in self.critical))

    def judge(self, metric: float) -> tuple[bool, float]:
        return metric >= 0, -metric

    def evaluate(self, plan: Plan) -> EvalResult:
        self.plans.append(dict(plan))
        metric = self.metric(plan)
        ok, loss = self.judge(metric)
        return EvalResult(metric, ok, loss)


def drive(strategy: BinarySearch, fake: NeedsFloat, all_quant_ok: bool) -> tuple[list[int], dict | None]:
    """Run the reference protocol by hand; return the roll-back counts proposed and the final config."""
    answer = strategy.update_quant_config((all_quant_ok, 0.0))
    rolled: list[int] = []
    while not answer["stop_flag"]:
        config = answer["roll_back_config"]
        rolled.append(sum(not keep for keep in config.values()))
        answer = strategy.update_quant_config((fake.evaluate(config).ok, 0.0))
    return rolled, answer["roll_back_config"]


@pytest.mark.parametrize(
    ("n", "k", "expected_mids"),
    [
        (8, 3, [3, 1, 2]),  # pass at 3, fail at 1, pass at 2
        (10, 1, [4, 1, 0]),  # passes all the way down
        (10, 10, [4, 7, 8, 9]),  # fails until every layer is float
        (10, 6, [4, 7, 5]),
        (1, 1, [0]),
        (2, 1, [0]),
        (3, 3, [1, 2]),
    ],
)
def test_mid_sequence_is_the_references(n: int, k: int, expected_mids: list[int]) -> None:
    ranking = ranking_for(n)
    order = most_sensitive_first(ranking)
    strategy = BinarySearch()
    strategy.initialize(ranking)
    rolled, final = drive(strategy, NeedsFloat(order, k), all_quant_ok=False)
    # mid means: positions 0..mid are rolled back, so mid + 1 layers are float.
    assert [count - 1 for count in rolled] == expected_mids
    assert final == {name: index >= k for index, name in enumerate(order)}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 9, 11, 12, 13, 16, 17, 20, 31, 33])
def test_every_threshold_finds_the_minimal_roll_back_within_the_bound(n: int) -> None:
    ranking = ranking_for(n)
    order = most_sensitive_first(ranking)
    for k in range(1, n + 1):
        strategy = BinarySearch()
        strategy.initialize(ranking)
        fake = NeedsFloat(order, k)
        rolled, final = drive(strategy, fake, all_quant_ok=False)
        assert final == {name: index >= k for index, name in enumerate(order)}, (n, k)
        assert len(fake.plans) <= math.floor(math.log2(n)) + 2, (n, k, rolled)
        # Roll-backs are always prefixes of the most-sensitive-first order.
        for plan in fake.plans:
            floats = [index for index, name in enumerate(order) if not plan[name]]
            assert floats == list(range(len(floats)))


def test_all_quantized_ok_stops_at_once_with_everything_quantized() -> None:
    ranking = ranking_for(5)
    strategy = BinarySearch()
    strategy.initialize(ranking)
    answer = strategy.update_quant_config((True, 0.0))
    assert answer == {"stop_flag": True, "roll_back_config": dict.fromkeys(ranking, True)}


def test_ties_in_score_are_broken_by_name() -> None:
    strategy = BinarySearch()
    strategy.initialize({"b": 0.5, "a": 0.5, "c": 0.1})
    config = strategy.update_quant_config((False, 1.0))["roll_back_config"]
    # n=3: mid=1 rolls back "c" (most sensitive) and "a" (tie with "b", first by name).
    assert config == {"c": False, "a": False, "b": True}


def test_initialize_resets_a_used_instance() -> None:
    ranking = ranking_for(6)
    order = most_sensitive_first(ranking)
    strategy = BinarySearch()
    strategy.initialize(ranking)
    first = drive(strategy, NeedsFloat(order, 2), all_quant_ok=False)
    strategy.initialize(ranking)
    assert drive(strategy, NeedsFloat(order, 2), all_quant_ok=False) == first


# -- through the adapter and the real search loop (Optuna in-memory study, fake evaluator) --------


def run_loop(study: optuna.Study, n: int, k: int) -> tuple[NeedsFloat, SearchLoop, dict[str, bool] | None]:
    names = layer_names(n)
    ranking = Ranking(ranking_for(n))
    fake = NeedsFloat(ranking.most_sensitive_first(), k)
    costs = {name: LayerCost(macs=100 + i, params=10) for i, name in enumerate(names)}
    store = SearchStudy(study, names, costs, "macs", fingerprint="fake")
    loop = SearchLoop(store, fake.evaluate, fake.judge, SearchProgress(False), fingerprint="fake")
    all_quant = loop.answer(Proposal(dict.fromkeys(names, True), "all_quant")).result
    strategy = resolve_strategy("BinarySearch")
    assert isinstance(strategy, ReferenceStrategyAdapter)
    strategy.start(SearchContext(ranking.most_sensitive_first(), ranking, costs, "macs", all_quant))
    outcome = loop.run(strategy)
    return fake, loop, outcome.final_plan


@pytest.mark.parametrize(("n", "k"), [(9, 1), (9, 4), (9, 9), (16, 11)])
def test_search_loop_runs_binary_search_within_the_bound(n: int, k: int) -> None:
    study = optuna.create_study(direction="maximize")
    fake, loop, final = run_loop(study, n, k)
    order = Ranking(ranking_for(n)).most_sensitive_first()
    assert final == {name: index >= k for index, name in enumerate(order)}
    # The first evaluation is the all-quantized plan; the bound counts the ones after it.
    assert fake.plans[0] == dict.fromkeys(layer_names(n), True)
    assert len(fake.plans) - 1 <= math.floor(math.log2(n)) + 2
    assert loop.evaluations == len(fake.plans)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == len(fake.plans)
    assert {name for name in trials[0].params} == set(layer_names(n))
    assert all(t.user_attrs["ok"] == (t.user_attrs["metric"] >= 0) for t in trials)


def test_search_loop_rerun_on_the_same_study_evaluates_nothing() -> None:
    study = optuna.create_study(direction="maximize")
    first, _, final = run_loop(study, 12, 5)
    again, loop, final_again = run_loop(study, 12, 5)
    assert first.plans and again.plans == []
    assert loop.evaluations == 0
    assert final_again == final


def test_adapter_rejects_a_malformed_answer() -> None:
    class Broken(BinarySearch):
        def update_quant_config(self, metric_eval_result: tuple[bool, float]) -> dict:
            return {"roll_back_config": {}}

    adapter = ReferenceStrategyAdapter(Broken())
    ranking = Ranking({"a": 0.1})
    adapter.start(SearchContext(["a"], ranking, {"a": LayerCost(1, 1)}, "macs", EvalResult(0.0, False, 1.0)))
    with pytest.raises(StrategyError, match="update_quant_config"):
        adapter.ask()


@pytest.mark.parametrize("bad", ["Bisect", 3, object(), None])
def test_unknown_strategy_is_a_strategy_error(bad: object) -> None:
    with pytest.raises(StrategyError, match="strategy"):
        resolve_strategy(bad)
