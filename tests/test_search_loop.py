"""SearchLoop: mutations of repeated proposals, the budget's count, and stopping on other workers' results."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).parent / "strategies"))
from search_fakes import Landscape, make_landscape, run_strategy  # noqa: E402

from amct_opt.progress import SearchProgress  # noqa: E402
from amct_opt.search_loop import MAX_MUTATION_FLIPS, SearchLoop  # noqa: E402
from amct_opt.strategies import OptunaSearch  # noqa: E402
from amct_opt.strategies.base import Proposal, SearchStrategy  # noqa: E402
from amct_opt.trials import SearchStudy  # noqa: E402
from amct_opt.types import EvalResult, Plan  # noqa: E402


def _loop(n_layers: int) -> tuple[SearchLoop, SearchStudy]:
    landscape = make_landscape(n_layers)
    study = optuna.create_study(direction="maximize")
    searched = SearchStudy(study, landscape.layers, landscape.costs, "macs", fingerprint="fake")
    loop = SearchLoop(searched, landscape.evaluate, landscape.judge, SearchProgress(False), fingerprint="fake")
    return loop, searched


def test_a_mutation_is_a_near_unknown_config_and_reproducible() -> None:
    loop, study = _loop(6)
    plan = dict.fromkeys(study.layers, True)
    for flipped in (set(), {"layer0"}, {"layer1"}):
        loop.answer(Proposal({n: n not in flipped for n in study.layers}, "test"))
    study.enqueue({n: n != "layer2" for n in study.layers}, "queued")  # queued counts as known too
    known = study.known_keys()
    assert len(known) == 4
    mutated = loop.mutated(plan)
    assert mutated is not None and study.key(mutated) not in known
    assert 1 <= sum(mutated[n] != plan[n] for n in study.layers) <= MAX_MUTATION_FLIPS
    assert loop.mutated(plan) == mutated  # same study, same config: the same mutation


def test_no_mutation_when_every_neighbour_is_known() -> None:
    loop, study = _loop(2)
    for values in itertools.product([True, False], repeat=2):
        if any(values):
            loop.answer(Proposal(dict(zip(study.layers, values)), "test"))
    assert loop.mutated(dict.fromkeys(study.layers, True)) is None


def test_the_budget_is_exact_and_leaves_no_refused_trial_in_one_process() -> None:
    # The loop counts its own evaluations instead of re-reading the study after each one.
    run = run_strategy(make_landscape(8, seed=5), OptunaSearch(n_trials=9, seed=0, show_progress=False))
    assert run.study.evaluated_count() == 9
    assert run.study.evaluated_count(fresh=False) == 9
    assert not [t for t in run.study.study.trials if t.state != TrialState.COMPLETE]


def test_a_queued_trial_carries_its_source_and_fingerprint() -> None:
    loop, study = _loop(3)
    study.enqueue(dict.fromkeys(study.layers, True), "queued")
    (waiting,) = study.study.get_trials(states=(TrialState.WAITING,))
    assert waiting.user_attrs == {"source": "queued", "fingerprint": "fake"}


def test_a_worker_stops_once_the_stored_evaluations_settle_the_search() -> None:
    """A worker that has not seen another worker's result must not evaluate once that result proves the optimum."""
    landscape = Landscape({"big": 0.01, "mid": 0.02, "small": 5.0}, {"big": 1000, "mid": 500, "small": 10}, target=1.0)
    study = optuna.create_study(direction="maximize")

    def worker() -> SearchLoop:
        searched = SearchStudy(study, landscape.layers, landscape.costs, "macs", fingerprint="fake")
        return SearchLoop(searched, landscape.evaluate, landscape.judge, SearchProgress(False), fingerprint="fake")

    other, late = worker(), worker()
    all_quant = other.answer(Proposal(dict.fromkeys(landscape.layers, True), "all_quant"))
    assert all_quant is not None
    strategy = OptunaSearch(n_trials=50, seed=0, show_progress=False)
    strategy.start(landscape.context(all_quant.result, []))  # it read the study before the optimum was stored
    other.answer(Proposal({"big": True, "mid": True, "small": False}, "other"))  # the only better config
    outcome = late.run(strategy)
    assert late.evaluations == 0
    assert "settled" in outcome.stop_reason
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 2


class _OnlySampler(SearchStrategy):
    """Every turn is the sampler's, ``turns`` times."""

    def __init__(self, turns: int) -> None:
        self.turns = turns
        self.told: list[dict[str, bool]] = []

    def start(self, context: Any) -> None:
        return None

    def ask(self) -> Proposal | None:
        self.turns -= 1
        return Proposal(None, "sampler") if self.turns >= 0 else None

    def tell(self, plan: Plan, result: EvalResult) -> None:
        self.told.append(dict(plan))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_sampler_turn_that_repeats_a_stored_config_evaluates_a_neighbour_instead() -> None:
    landscape = make_landscape(5)
    all_int8 = dict.fromkeys(landscape.layers, "int8")
    sampler = optuna.samplers.PartialFixedSampler(all_int8, optuna.samplers.RandomSampler(seed=0))
    study = optuna.create_study(direction="maximize", sampler=sampler)  # proposes all-INT8 every time
    searched = SearchStudy(study, landscape.layers, landscape.costs, "macs", fingerprint="fake")
    loop = SearchLoop(searched, landscape.evaluate, landscape.judge, SearchProgress(False), fingerprint="fake")
    strategy = _OnlySampler(turns=4)
    loop.run(strategy)
    keys = [searched.key(r.plan) for r in searched.records()]
    assert loop.evaluations == 4 and len(set(keys)) == 4  # the first turn, then three neighbours
    assert keys[0] == (True,) * 5
    assert all(1 <= sum(not on for on in key) <= MAX_MUTATION_FLIPS for key in keys[1:])
    assert [searched.key(p) for p in strategy.told] == keys  # the strategy is told what was evaluated
    sources = [r.source for r in searched.records()]
    assert sources == ["sampler"] + ["sampler_mutation"] * 3
