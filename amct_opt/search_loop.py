"""The search loop, written once for every strategy: ask → evaluate → store → tell.

Each evaluation runs as one Optuna trial through ``study.optimize`` so that
Optuna's heartbeats, failure handling and retries apply.  A plan already in
the study is answered from it and never evaluated again; a plan that another
worker is evaluating right now is skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from .errors import EvaluatorError
from .progress import SearchProgress
from .strategies.base import Proposal, SearchStrategy
from .trials import CHOICES, CONSTRAINT_KEY, INT8, Judge, SearchStudy, TrialRecord, constraint_value
from .types import EvalResult, Plan

__all__ = ["EvaluationFailed", "SearchOutcome", "SearchLoop"]

logger = logging.getLogger(__name__)

#: Consecutive sampler proposals that repeat stored configs before the search stops.
MAX_CONSECUTIVE_REPEATS = 25


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

    # -- one trial ------------------------------------------------------------
    def values(self, plan: Plan, result: EvalResult) -> list[float]:
        share = self.study.share(plan)
        return [result.loss, share] if self.multi_objective else [share]

    def _objective(self, answer: _TrialAnswer, source: str) -> Callable[[optuna.Trial], Any]:
        def objective(trial: optuna.Trial) -> Any:
            answer.number = trial.number
            plan = {
                name: trial.suggest_categorical(name, CHOICES) == INT8 for name in self.study.layers
            }
            trial.set_user_attr("fingerprint", self.fingerprint)
            if "source" not in trial.user_attrs:
                trial.set_user_attr("source", source)
            stored = self.study.lookup(plan, self.judge)
            if stored is not None:
                for key, value in self.study.attrs_for(plan, stored.result).items():
                    trial.set_user_attr(key, value)
                trial.set_user_attr("cached_from", stored.number)
                trial.set_constraint(CONSTRAINT_KEY, constraint_value(stored.result.ok))
                answer.record = stored
                self.progress.reused(trial.number, stored.number)
                return self._returned(self.values(plan, stored.result))
            if self.study.running_duplicate(trial.number, plan):
                raise optuna.TrialPruned("the same config is being evaluated by another worker")
            try:
                result = self.evaluate(plan)
            except (EvaluatorError, KeyboardInterrupt):
                raise
            except Exception as exc:
                answer.failed = True
                raise EvaluationFailed(f"model_evaluator.evaluate raised {exc!r}") from exc
            for key, value in self.study.attrs_for(plan, result).items():
                trial.set_user_attr(key, value)
            trial.set_constraint(CONSTRAINT_KEY, constraint_value(result.ok))
            record = TrialRecord(trial.number, plan, result, self.study.share(plan), source)
            answer.record = record
            self.evaluations += 1
            self.progress.evaluated(
                trial.number, sum(plan.values()), record.share, result, self.study.evaluated_count() + 1
            )
            return self._returned(self.values(plan, result))

        return objective

    def _returned(self, values: list[float]) -> Any:
        return values if self.multi_objective else values[0]

    def run_trial(self, source: str) -> _TrialAnswer:
        """Run one trial (the next queued plan, or the sampler's)."""
        answer = _TrialAnswer(number=-1)
        self.study.study.optimize(
            self._objective(answer, source),
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

    # -- the loop -------------------------------------------------------------
    def answer(self, proposal: Proposal) -> TrialRecord:
        """The stored result of a fixed plan, evaluating it first if needed."""
        assert proposal.plan is not None
        while True:
            stored = self.study.lookup(proposal.plan, self.judge)
            if stored is not None:
                return stored
            self.study.enqueue(proposal.plan, proposal.source)
            self.run_trial(proposal.source)

    def _budget_left(self, strategy: SearchStrategy, started: float) -> str | None:
        if strategy.n_trials is not None and self.study.evaluated_count() >= strategy.n_trials:
            return f"budget of {strategy.n_trials} evaluations reached"
        if strategy.timeout is not None and time.monotonic() - started >= strategy.timeout:
            return f"timeout of {strategy.timeout:g} s reached"
        return None

    def run(self, strategy: SearchStrategy) -> SearchOutcome:
        started = time.monotonic()
        repeats = 0
        reason = "strategy finished"
        while True:
            stop = self._budget_left(strategy, started)
            if stop:
                reason = stop
                break
            proposal = strategy.ask()
            if proposal is None:
                break
            if proposal.plan is not None:
                record = self.answer(proposal)
                strategy.tell(record.plan, record.result)
                continue
            before = self.evaluations
            answer = self.run_trial(proposal.source)
            if answer.record is not None:
                strategy.tell(answer.record.plan, answer.record.result)
            repeats = 0 if self.evaluations > before else repeats + 1
            if repeats >= MAX_CONSECUTIVE_REPEATS:
                reason = f"the sampler proposed {repeats} stored configs in a row"
                break
        logger.info("search stopped: %s", reason)
        return SearchOutcome(strategy.final_plan(), self.evaluations, self.failures, reason)
