"""The search loop, written once for every strategy: ask → evaluate → store → tell.

Each evaluation runs as one Optuna trial through ``study.optimize`` so that
Optuna's heartbeats, failure handling and retries apply.  A plan already in
the study is answered from it and never evaluated again; a plan that another
worker is evaluating right now is skipped.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from .distributed import Coordinator, fail_stale_trials, poll_delay
from .errors import EvaluatorError
from .progress import SearchProgress
from .strategies.base import Proposal, SearchStrategy
from .trials import CHOICES, CONSTRAINT_KEY, INT8, Judge, SearchStudy, TrialRecord, constraint_value
from .types import EvalResult, Plan

__all__ = ["EvaluationFailed", "SearchOutcome", "SearchLoop"]

logger = logging.getLogger(__name__)

#: Consecutive sampler proposals that repeat stored configs before the search stops.
MAX_CONSECUTIVE_REPEATS = 25
#: Seconds between checks on a config that another trial is evaluating.
POLL_S = 0.5
#: Layers flipped at most when a repeated sampler proposal is mutated into a new config.
MAX_MUTATION_FLIPS = 3
#: Why a claim is refused, and the search stops, once every stored evaluation proves it over.
SETTLED = "the stored evaluations (other workers' too) settled the search"


class EvaluationFailed(Exception):
    """The user's ``evaluate()`` raised; the trial is marked FAIL and the search goes on."""


@dataclass(frozen=True)
class SearchOutcome:
    final_plan: dict[str, bool] | None
    evaluations: int
    failures: int
    stop_reason: str


@dataclass
class _TrialAnswer:
    number: int
    record: TrialRecord | None = None
    failed: bool = False


class SearchLoop:
    """Runs a :class:`SearchStrategy` against a :class:`SearchStudy`."""

    def __init__(
        self,
        study: SearchStudy,
        evaluate: Callable[[Plan], EvalResult],
        judge: Judge,
        progress: SearchProgress,
        *,
        fingerprint: str,
        multi_objective: bool = False,
        max_failures: int = 3,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.study = study
        self.evaluate = evaluate
        self.judge = judge
        self.progress = progress
        self.fingerprint = fingerprint
        self.multi_objective = multi_objective
        self.max_failures = max_failures
        self.failures = 0
        self.evaluations = 0
        #: Shared with the other workers of the study: the budget and running duplicates.
        self.coordinator = coordinator or Coordinator(study.study)
        self.budget: int | None = None
        self.budget_spent = False
        #: Set when a claim found the search over by every stored evaluation (other workers' too).
        self.finished_elsewhere = False
        self._strategy: SearchStrategy | None = None
        self._known: set[tuple[bool, ...]] = set()  # configs the strategy was told or shown

    # -- one trial ------------------------------------------------------------
    def values(self, plan: Plan, result: EvalResult) -> list[float]:
        share = self.study.share(plan)
        return [result.loss, share] if self.multi_objective else [share]

    def _objective(self, answer: _TrialAnswer, source: str, queued_only: bool) -> Callable[[optuna.Trial], Any]:
        def objective(trial: optuna.Trial) -> Any:
            answer.number = trial.number
            if queued_only and "source" not in trial.user_attrs:  # queued trials carry their source
                raise optuna.TrialPruned("another worker took the queued config first")
            plan = {
                name: trial.suggest_categorical(name, CHOICES) == INT8 for name in self.study.layers
            }
            if trial.user_attrs.get("fingerprint") != self.fingerprint:
                trial.set_user_attr("fingerprint", self.fingerprint)
            if "source" not in trial.user_attrs:
                trial.set_user_attr("source", source)
            # A queued plan was looked up just before it was queued; should another worker store it
            # meanwhile, the claim refuses it and answer() finds it stored.
            stored = None if queued_only else self.study.lookup(plan, self.judge)
            if stored is not None:
                for key, value in self.study.attrs_for(plan, stored.result).items():
                    trial.set_user_attr(key, value)
                trial.set_user_attr("cached_from", stored.number)
                trial.set_constraint(CONSTRAINT_KEY, constraint_value(stored.result.ok))
                answer.record = stored
                self.progress.reused(trial.number, stored.number)
                return self._returned(self.values(plan, stored.result))
            refused = self.coordinator.claim(self.study, trial, plan, self.budget, self._finished)
            if refused is not None:
                self.budget_spent = refused == "budget"
                raise optuna.TrialPruned(f"budget of {self.budget} reached" if self.budget_spent else refused)
            try:
                result = self.evaluate(plan)
            except (EvaluatorError, KeyboardInterrupt):
                raise
            except Exception as exc:
                answer.failed = True
                logger.warning(
                    "trial %d: model_evaluator.evaluate raised %r; the trial is marked FAIL "
                    "(failure %d, max_failures=%d)", trial.number, exc, self.failures + 1,
                    self.max_failures, exc_info=True,
                )
                raise EvaluationFailed(f"model_evaluator.evaluate raised {exc!r}") from exc
            for key, value in self.study.attrs_for(plan, result).items():
                trial.set_user_attr(key, value)
            trial.set_constraint(CONSTRAINT_KEY, constraint_value(result.ok))
            record = TrialRecord(trial.number, plan, result, self.study.share(plan), source)
            answer.record = record
            self.evaluations += 1
            self.study.note_evaluation()
            if self.progress.enabled:
                self.progress.evaluated(
                    trial.number, sum(plan.values()), record.share, result, self.study.evaluated_count(fresh=False)
                )
            return self._returned(self.values(plan, result))

        return objective

    def _finished(self, records: list[TrialRecord]) -> str | None:
        """Show the strategy the stored evaluations it does not know yet; why the search is over, or None."""
        if self._strategy is None:
            return None
        for record in records:
            key = self.study.key(record.plan)
            if key not in self._known:
                self._known.add(key)
                metric = record.result.metric
                ok, loss = self.judge(metric)
                self._strategy.observe(record.plan, EvalResult(metric, ok, loss, record.result.duration_s))
        if not self._strategy.finished():
            return None
        self.finished_elsewhere = True
        return SETTLED

    def _tell(self, strategy: SearchStrategy, record: TrialRecord) -> None:
        self._known.add(self.study.key(record.plan))
        strategy.tell(record.plan, record.result)

    def _returned(self, values: list[float]) -> Any:
        return values if self.multi_objective else values[0]

    def run_trial(self, source: str, queued_only: bool = False) -> _TrialAnswer:
        """Run one trial: the next queued plan, or the sampler's (pruned at once with ``queued_only``)."""
        answer = _TrialAnswer(number=-1)
        self.study.study.optimize(
            self._objective(answer, source, queued_only),
            n_trials=1,
            catch=(EvaluationFailed,),
            gc_after_trial=False,
        )
        if answer.failed:
            self.failures += 1
            if self.failures > self.max_failures:
                raise EvaluatorError(
                    f"model_evaluator.evaluate: failed {self.failures} times (max_failures="
                    f"{self.max_failures}); the study keeps every completed trial, re-run to resume"
                )
        return answer

    def mutated(self, plan: Plan) -> dict[str, bool] | None:
        """A config near ``plan`` that is neither stored nor queued nor running; None if none is found.

        Flips one layer, else two, else three, chosen at random (seeded by the
        config and the study's size, so that one process is reproducible).  A
        sampler in a small binary space soon proposes stored configs again; its
        repeat is turned into a new neighbouring config instead of a wasted turn.
        """
        known = self.study.known_keys()
        layers = list(self.study.layers)
        rng = random.Random(f"{self.study.key(plan)}:{len(known)}")
        for flips in range(1, min(MAX_MUTATION_FLIPS, len(layers)) + 1):
            for _ in range(4 * len(layers)):
                chosen = set(rng.sample(layers, flips))
                candidate = {name: plan[name] != (name in chosen) for name in layers}
                if any(candidate.values()) and self.study.key(candidate) not in known:
                    return candidate
        return None

    def sample(self, source: str) -> _TrialAnswer:
        """A sampler trial; when it repeats a stored config, evaluate a new neighbour of it instead.

        A converged sampler repeats itself turn after turn (more so with several
        workers filling the study), and each repeat is a trial that evaluates
        nothing: the turn goes to a new config near the sampler's choice instead.
        """
        before = self.evaluations
        answer = self.run_trial(source)
        if self.evaluations > before or self.budget_spent or self.finished_elsewhere or answer.record is None:
            return answer
        neighbour = self.mutated(answer.record.plan)
        if neighbour is None:
            return answer
        record = self.answer(Proposal(neighbour, f"{source}_mutation"))  # queued like a fixed plan
        return _TrialAnswer(-1 if record is None else record.number, record)

    # -- the loop -------------------------------------------------------------
    def answer(self, proposal: Proposal, meanwhile: bool = False) -> TrialRecord | None:
        """The stored result of a fixed plan, evaluating it first if needed; None when the budget is spent.

        With ``meanwhile``, a worker whose plan another worker is evaluating runs
        sampler trials until that result is stored, instead of idling.
        """
        assert proposal.plan is not None
        waiting_logged = False
        misses = 0  # meanwhile trials in a row that evaluated nothing (the sampler repeated itself)
        started = time.monotonic()
        while True:
            stored = self.study.lookup(proposal.plan, self.judge)
            if stored is not None:
                return stored
            state = self.study.pending(proposal.plan)
            if state is TrialState.RUNNING and meanwhile:
                fail_stale_trials(self.study.study)  # a crashed worker's trial is re-queued meanwhile too
                before = self.evaluations
                self.sample("sampler")
                if self.budget_spent or self.finished_elsewhere:
                    return None
                misses = 0 if self.evaluations > before else misses + 1
                if misses:
                    time.sleep(min(POLL_S, 0.05 * 2**misses))
                continue
            if state is TrialState.RUNNING:
                # Another worker evaluates it, or a crashed run left it RUNNING: Optuna's
                # heartbeat fails a stale trial after the grace period and re-queues it.
                if not waiting_logged:
                    self.progress.note(
                        "waiting for a running trial with the same config (another worker's, or "
                        "one left by a crash: it is failed and re-queued once its heartbeat is stale)"
                    )
                    waiting_logged = True
                time.sleep(poll_delay(time.monotonic() - started, POLL_S))
                fail_stale_trials(self.study.study)
                continue
            if state is None:
                self.study.enqueue(proposal.plan, proposal.source, checked=True)
            answer = self.run_trial(proposal.source, queued_only=True)
            if self.budget_spent or self.finished_elsewhere:
                return None
            wanted = {name: bool(proposal.plan[name]) for name in self.study.layers}
            if answer.record is not None and answer.record.plan == wanted:
                return answer.record  # evaluated just now: no need to read it back

    def _budget_left(self, strategy: SearchStrategy, started: float) -> str | None:
        # The count as of the last read (at the latest, this trial's claim), plus this process's
        # evaluations since: a lower bound; the claim enforces the budget exactly.
        if strategy.n_trials is not None and self.study.evaluated_count(fresh=False) >= strategy.n_trials:
            return f"budget of {strategy.n_trials} evaluations reached"
        if strategy.timeout is not None and time.monotonic() - started >= strategy.timeout:
            return f"timeout of {strategy.timeout:g} s reached"
        return None

    def run(self, strategy: SearchStrategy) -> SearchOutcome:
        """Ask, evaluate, tell until the strategy, the global budget or the timeout stops it.

        Other workers' evaluations are waited for (unless on timeout), so every
        worker chooses its final plan from the same evaluations.
        """
        started = time.monotonic()
        self.budget = strategy.n_trials
        meanwhile = strategy.study_sampler() is not None
        self._strategy, self.finished_elsewhere = strategy, False
        self._known = set()  # the strategy ignores what it was started with (its history)
        repeats = 0
        reason = "strategy finished"
        held: Proposal | None = None  # a fixed plan the budget refused until a running one fails
        while True:
            if self.budget_spent:
                # Other workers' evaluations fill the budget: wait, unless one fails and frees it.
                self.budget_spent = False
                self.coordinator.wait_for_others(self.study, self.budget)
            stop = self._budget_left(strategy, started)
            if self.finished_elsewhere:
                stop = SETTLED
            if stop:
                reason = stop
                break
            proposal, held = held or strategy.ask(), None
            if proposal is None:
                break
            if proposal.plan is not None:
                record = self.answer(proposal, meanwhile)
                if record is None:
                    held = proposal
                else:
                    self._tell(strategy, record)
                continue
            before = self.evaluations
            answer = self.sample(proposal.source)
            if answer.record is not None:
                self._tell(strategy, answer.record)
            repeats = 0 if self.evaluations > before or self.budget_spent else repeats + 1
            if repeats >= MAX_CONSECUTIVE_REPEATS:
                reason = f"the sampler proposed {repeats} stored configs in a row"
                break
        timed_out = strategy.timeout is not None and time.monotonic() - started >= strategy.timeout
        if not timed_out:
            self.coordinator.wait_for_others(self.study, None)
        logger.info("search stopped: %s", reason)
        return SearchOutcome(strategy.final_plan(), self.evaluations, self.failures, reason)
