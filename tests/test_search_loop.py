"""SearchLoop.mutated: a repeated sampler proposal becomes a new neighbouring config, never a known one."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent / "strategies"))
from search_fakes import make_landscape  # noqa: E402

from amct_opt.progress import SearchProgress  # noqa: E402
from amct_opt.search_loop import MAX_MUTATION_FLIPS, SearchLoop  # noqa: E402
from amct_opt.strategies.base import Proposal  # noqa: E402
from amct_opt.trials import SearchStudy  # noqa: E402


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
