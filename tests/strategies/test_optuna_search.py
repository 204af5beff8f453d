"""OptunaSearch on a torch-free landscape: ask/tell alone, then through the real SearchLoop and Optuna."""

from __future__ import annotations

import itertools
import math
import time
import warnings

import numpy as np
import optuna
import pytest
from search_fakes import Landscape, make_landscape, run_strategy

from amct_opt.errors import StrategyError
from amct_opt.strategies import BinarySearch, OptunaSearch
from amct_opt.strategies._loss_model import best_under_capacity
from amct_opt.strategies.base import ReferenceStrategyAdapter
from amct_opt.strategies.optuna_search import SAMPLER_EVERY, SAMPLER_NAMES, make_sampler
from amct_opt.trials import CONSTRAINT_KEY
from amct_opt.types import EvalResult

optuna.logging.set_verbosity(optuna.logging.WARNING)


def key(landscape: Landscape, plan: dict[str, bool]) -> tuple[bool, ...]:
    return tuple(plan[name] for name in landscape.layers)


def drive(landscape: Landscape, strategy: OptunaSearch, steps: int) -> list[tuple[str, tuple[bool, ...] | None]]:
    """ask/tell without a study: fixed plans are evaluated, sampler turns are recorded and skipped."""
    all_quant = landscape.evaluate(dict.fromkeys(landscape.layers, True))
    strategy.start(landscape.context(all_quant))
    asked = []
    for _ in range(steps):
        proposal = strategy.ask()
        if proposal is None:
            break
        if proposal.plan is None:
            asked.append((proposal.source, None))
            continue
        asked.append((proposal.source, key(landscape, proposal.plan)))
        strategy.tell(proposal.plan, landscape.evaluate(proposal.plan))
    return asked


# -- ask / tell alone ---------------------------------------------------------------------
def test_warm_start_is_binary_search_path() -> None:
    landscape = make_landscape(10, seed=1)
    asked = drive(landscape, OptunaSearch(n_trials=30, seed=0), 30)
    reference = BinarySearch()
    reference.initialize(landscape.ranking.scores)
    last = landscape.evaluate(dict.fromkeys(landscape.layers, True))
    expected = []
    while True:
        answer = reference.update_quant_config((last.ok, last.loss))
        if answer["stop_flag"]:
            break
        expected.append(key(landscape, answer["roll_back_config"]))
        last = landscape.evaluate(answer["roll_back_config"])
    assert [plan for source, plan in asked[: len(expected)]] == expected
    assert all(source == "warm_start:binary_search" for source, _ in asked[: len(expected)])
    assert asked[len(expected)][0] != "warm_start:binary_search"


def test_never_proposes_a_known_config() -> None:
    landscape = make_landscape(9, seed=2)
    asked = drive(landscape, OptunaSearch(n_trials=60, seed=0), 60)
    fixed = [plan for _, plan in asked if plan is not None]
    assert len(fixed) == len(set(fixed))
    assert tuple([True] * 9) not in fixed  # the all-quantized config was told at start


def test_sampler_gets_every_nth_turn_after_the_warm_start() -> None:
    landscape = make_landscape(12, seed=3)
    asked = drive(landscape, OptunaSearch(n_trials=40, seed=0), 40)
    after = [source for source, _ in asked if source != "warm_start:binary_search"]
    assert after[SAMPLER_EVERY - 1] == "sampler"
    assert "loss_model" in after[: SAMPLER_EVERY - 1]


def test_resume_history_keeps_the_warm_start_on_the_all_quantized_result() -> None:
    landscape = make_landscape(10, seed=4)
    first = drive(landscape, OptunaSearch(n_trials=20, seed=0), 1)[0]
    history = [(dict.fromkeys(landscape.layers, False), landscape.evaluate(dict.fromkeys(landscape.layers, False)))]
    strategy = OptunaSearch(n_trials=20, seed=0)
    strategy.start(landscape.context(landscape.evaluate(dict.fromkeys(landscape.layers, True)), history))
    proposal = strategy.ask()
    assert proposal is not None and proposal.plan is not None
    assert (proposal.source, key(landscape, proposal.plan)) == first


def test_stops_when_the_optimum_is_proven() -> None:
    # Only the smallest layer hurts: keeping it float is the optimum, and nothing between it and
    # the (failing) all-quantized config is left to try.
    losses = {"big": 0.01, "mid": 0.02, "small": 5.0}
    landscape = Landscape(losses, {"big": 1000, "mid": 500, "small": 10}, target=1.0)
    run = run_strategy(landscape, OptunaSearch(n_trials=50, seed=0, show_progress=False))
    best = run.study.best_feasible(landscape.judge)
    assert best is not None and best.plan == {"big": True, "mid": True, "small": False}
    assert run.study.evaluated_count() < 50
    assert run.stop_reason == "strategy finished"


def test_evaluations_observed_from_other_workers_settle_the_search() -> None:
    losses = {"big": 0.01, "mid": 0.02, "small": 5.0}
    landscape = Landscape(losses, {"big": 1000, "mid": 500, "small": 10}, target=1.0)
    strategy = OptunaSearch(n_trials=50, seed=0)
    strategy.start(landscape.context(landscape.evaluate(dict.fromkeys(landscape.layers, True))))
    assert not strategy.finished()
    # Other workers stored a feasible config, then the optimum (all but the smallest layer).
    smaller = {"big": True, "mid": False, "small": True}
    strategy.observe(smaller, landscape.evaluate(smaller))
    assert not strategy.finished()  # {big, mid} quantizes more and is untried
    optimum = {"big": True, "mid": True, "small": False}
    strategy.observe(optimum, landscape.evaluate(optimum))
    assert strategy.finished()


def test_objective_layers_counts_layers() -> None:
    landscape = make_landscape(6, seed=5)
    strategy = OptunaSearch(n_trials=10, objective="layers")
    strategy.start(landscape.context(landscape.evaluate(dict.fromkeys(landscape.layers, True))))
    assert strategy._share(tuple([True, False] * 3)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "cmaes"}, "sampler: unknown name 'cmaes'"),
        ({"sampler": 3}, "sampler: expected an optuna.samplers.BaseSampler"),
        ({"n_trials": 0}, "n_trials: expected a positive int"),
        ({"timeout": -1.0}, "timeout: expected a positive number of seconds"),
        ({"objective": "flops"}, "objective: expected one of"),
        ({"seed": True}, "seed: expected an int"),
        ({"study_name": ""}, "study_name: expected a non-empty string"),
        ({"max_failures": -1}, "max_failures: expected an int >= 0"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(StrategyError, match=message):
        OptunaSearch(**kwargs)


def test_make_sampler_builds_every_name_quietly() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samplers = {name: make_sampler(name, 0) for name in SAMPLER_NAMES}
    assert all(isinstance(s, optuna.samplers.BaseSampler) for s in samplers.values())
    assert isinstance(OptunaSearch(multi_objective=True).study_sampler(), optuna.samplers.NSGAIISampler)
    assert isinstance(OptunaSearch().study_sampler(), optuna.samplers.TPESampler)
    mine = optuna.samplers.RandomSampler(seed=1)
    assert OptunaSearch(sampler=mine).study_sampler() is mine


def test_knapsack_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        values = rng.uniform(1, 100, 7)
        weights = rng.uniform(0, 10, 7)
        capacity = float(rng.uniform(5, 30))
        chosen = best_under_capacity(values, weights, capacity)
        assert weights @ chosen < capacity
        best = max(
            values @ np.array(bits)
            for bits in itertools.product([0, 1], repeat=7)
            if weights @ np.array(bits) < capacity * (1 - 1e-3) - 1e-9
        )
        assert values @ chosen >= best - 1e-9


# -- through the SearchLoop and a real Optuna study ---------------------------------------
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_proposes_through_the_loop(name: str) -> None:
    landscape = make_landscape(6, seed=6)
    n_trials = 5 if name == "gp" else 10
    strategy = OptunaSearch(name, n_trials=n_trials, seed=0, warm_start=False, guided=False, show_progress=False)
    run = run_strategy(landscape, strategy)
    sources = [r.source for r in run.study.records()]
    assert "sampler" in sources
    assert run.study.evaluated_count() <= n_trials
    assert len(landscape.calls) == len(set(landscape.calls))


def test_no_config_is_evaluated_twice_even_when_the_sampler_repeats() -> None:
    landscape = make_landscape(5, seed=7)  # 32 configs: the sampler soon proposes stored ones
    run = run_strategy(landscape, OptunaSearch("random", n_trials=32, seed=0, show_progress=False))
    assert len(landscape.calls) == len(set(landscape.calls)) == run.study.evaluated_count()
    cached = [t for t in run.study.study.trials if "cached_from" in t.user_attrs]
    assert cached, "the random sampler on 32 configs repeats some; they must be answered from the study"
    for trial in cached:
        source = run.study.study.trials[trial.user_attrs["cached_from"]]
        assert trial.params == source.params and trial.value == source.value


def test_keeps_searching_after_the_first_feasible_config_until_the_budget() -> None:
    landscape = make_landscape(12, seed=8)
    run = run_strategy(landscape, OptunaSearch(n_trials=18, seed=0, show_progress=False))
    records = run.study.records(landscape.judge)
    first_ok = next(i for i, r in enumerate(records) if r.result.ok)
    assert run.study.evaluated_count() == 18
    assert len(records) - first_ok > 5


def test_trials_carry_the_feasibility_constraint() -> None:
    landscape = make_landscape(8, seed=9)
    run = run_strategy(landscape, OptunaSearch(n_trials=12, seed=0, show_progress=False))
    for trial in run.study.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert trial.constraints == {CONSTRAINT_KEY: 0.0 if trial.user_attrs["ok"] else 1.0}
    best = run.study.best_feasible(landscape.judge)
    assert best is not None and landscape.loss(best.plan) < landscape.target


def test_multi_objective_keeps_the_feasible_pareto_front() -> None:
    landscape = make_landscape(8, seed=10)
    run = run_strategy(landscape, OptunaSearch(n_trials=16, seed=0, multi_objective=True, show_progress=False))
    study = run.study.study
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    feasible = [r for r in run.study.records(landscape.judge) if r.result.ok]
    expected = {
        (round(r.result.loss, 9), round(r.share, 9))
        for r in feasible
        if not any(
            o.result.loss <= r.result.loss and o.share >= r.share and (o.result.loss, o.share) != (r.result.loss, r.share)
            for o in feasible
        )
    }
    front = {(round(t.values[0], 9), round(t.values[1], 9)) for t in study.best_trials}
    assert front == expected and len(front) >= 2
    ours = run.study.pareto_front(landscape.judge)
    assert {(round(r.result.loss, 9), round(r.share, 9)) for r in ours} == expected
    assert all(r.result.ok for r in ours) and [r.share for r in ours] == sorted(r.share for r in ours)


class SlowLandscape(Landscape):
    def evaluate(self, plan: dict[str, bool]) -> EvalResult:
        time.sleep(0.1)
        return super().evaluate(plan)


def test_timeout_ends_the_search() -> None:
    base = make_landscape(12, seed=13)
    landscape = SlowLandscape(base.losses, base.macs, base.target)
    strategy = OptunaSearch(timeout=0.8, seed=0, show_progress=False)
    started = time.monotonic()
    run = run_strategy(landscape, strategy)
    assert strategy.n_trials is None  # a timeout alone sets no evaluation budget
    assert run.stop_reason == "timeout of 0.8 s reached"
    assert time.monotonic() - started < 0.8 + 1.0
    assert 3 <= run.study.evaluated_count() <= 12


@pytest.mark.parametrize("seed", range(6))
def test_beats_binary_search_at_twice_its_evaluations(seed: int) -> None:
    landscape = make_landscape(12, seed=100 + seed, target_share=0.4)
    binary = run_strategy(landscape, ReferenceStrategyAdapter(BinarySearch()))
    budget = 2 * binary.study.evaluated_count()
    ours = run_strategy(
        Landscape(landscape.losses, landscape.macs, landscape.target),
        OptunaSearch(n_trials=budget, seed=seed, show_progress=False),
    )
    theirs = binary.study.best_feasible(landscape.judge)
    best = ours.study.best_feasible(landscape.judge)
    assert theirs is not None and best is not None
    assert best.share >= theirs.share
    optimum = max(
        (
            sum(landscape.macs[n] for n, on in zip(landscape.layers, bits) if on) / sum(landscape.macs.values())
            for bits in itertools.product([True, False], repeat=12)
            if landscape.loss(dict(zip(landscape.layers, bits))) < landscape.target
        ),
        default=0.0,
    )
    assert best.share >= 0.98 * optimum or math.isclose(best.share, optimum)


def test_one_instance_can_run_twice() -> None:
    strategy = OptunaSearch(seed=0, show_progress=False)
    small = run_strategy(make_landscape(4, seed=11), strategy)
    assert strategy.n_trials == OptunaSearch.default_budget(4)
    large_landscape = make_landscape(16, seed=12)
    large = run_strategy(large_landscape, strategy)
    assert strategy.n_trials == OptunaSearch.default_budget(16)
    assert large.study.evaluated_count() > small.study.evaluated_count()
    assert len(large_landscape.calls) == len(set(large_landscape.calls))
