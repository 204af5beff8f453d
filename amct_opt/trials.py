"""The search's memory: every evaluation is a trial in a persistent Optuna study.

Trial params are the layer decisions (``"int8"`` or ``"float"``, one per layer,
named by the layer); user attributes hold the metric, loss, feasibility and
quantized shares.  Study attributes hold what makes a re-run cheap: the float
metric, the calibration record, the ranking, the layer costs and the
fingerprint they belong to.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from .objectives import OBJECTIVES, quantized_share
from .types import EvalResult, LayerCost, OutputRange, OutputRanges, Plan

__all__ = ["INT8", "FLOAT", "TrialRecord", "SearchStudy", "CONSTRAINT_KEY", "constraint_value"]

INT8 = "int8"
FLOAT = "float"
CHOICES = (INT8, FLOAT)

Judge = Callable[[float], tuple[bool, float]]


#: The Optuna constraint a trial carries: <= 0 when the user's ``metric_eval`` said ok.
CONSTRAINT_KEY = "target_missed"


def constraint_value(ok: bool) -> float:
    return 0.0 if ok else 1.0


@dataclass(frozen=True)
class TrialRecord:
    """A completed evaluation read back from the study."""

    number: int
    plan: dict[str, bool]
    result: EvalResult
    share: float
    source: str


class SearchStudy:
    """An Optuna study seen as a table of plan → evaluation."""

    def __init__(
        self,
        study: optuna.Study,
        layers: Sequence[str],
        costs: Mapping[str, LayerCost],
        objective: str = "macs",
        fingerprint: str | None = None,
    ) -> None:
        self.study = study
        self.fingerprint = fingerprint
        self.layers = list(layers)
        self.costs = dict(costs)
        self.objective = objective
        self.distributions = {name: CategoricalDistribution(CHOICES) for name in self.layers}
        #: How many evaluations the last :meth:`records` read found (plus this process's since).
        self._count: int | None = None

    # -- plans and params --------------------------------------------------
    def params(self, plan: Plan) -> dict[str, str]:
        return {name: INT8 if plan[name] else FLOAT for name in self.layers}

    def plan_of(self, trial: FrozenTrial) -> dict[str, bool] | None:
        if any(name not in trial.params for name in self.layers):
            return None
        return {name: trial.params[name] == INT8 for name in self.layers}

    @staticmethod
    def key(plan: Plan) -> tuple[bool, ...]:
        return tuple(bool(v) for v in plan.values())

    def attrs_for(self, plan: Plan, result: EvalResult) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "metric": result.metric,
            "loss": result.loss,
            "ok": result.ok,
            "n_quantized": sum(bool(plan[name]) for name in self.layers),
            "eval_seconds": round(result.duration_s, 4),
        }
        for objective in OBJECTIVES:
            attrs[f"quant_share_{objective}"] = quantized_share(plan, self.costs, objective)
        return attrs

    def share(self, plan: Plan) -> float:
        return quantized_share(plan, self.costs, self.objective)

    # -- reading back ------------------------------------------------------
    def records(self, judge: Judge | None = None, trials: Sequence[FrozenTrial] | None = None) -> list[TrialRecord]:
        """Completed, really evaluated trials (cached copies excluded), oldest first.

        With ``judge``, feasibility is recomputed from the stored metric, so a
        changed target reuses every stored evaluation.  ``trials``: the study's
        trials as just read (any states), to save another read of the study.
        """
        if trials is None:
            trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        out: list[TrialRecord] = []
        for trial in trials:
            if trial.state is not TrialState.COMPLETE:
                continue
            attrs = trial.user_attrs
            plan = self.plan_of(trial)
            if plan is None or "metric" not in attrs or "cached_from" in attrs:
                continue
            if self.fingerprint and attrs.get("fingerprint", self.fingerprint) != self.fingerprint:
                continue
            ok, loss = judge(attrs["metric"]) if judge else (bool(attrs["ok"]), float(attrs["loss"]))
            result = EvalResult(attrs["metric"], ok, loss, float(attrs.get("eval_seconds", 0.0)))
            out.append(TrialRecord(trial.number, plan, result, self.share(plan), attrs.get("source", "")))
        self._count = len(out)
        return out

    def lookup(self, plan: Plan, judge: Judge | None = None) -> TrialRecord | None:
        wanted = self.key({name: plan[name] for name in self.layers})
        for record in self.records(judge):
            if self.key(record.plan) == wanted:
                return record
        return None

    def evaluated_count(self, fresh: bool = True) -> int:
        """The evaluations stored; with ``fresh=False``, as of the last read (a lower bound, no database trip)."""
        if fresh or self._count is None:
            return len(self.records())
        return self._count

    def note_evaluation(self) -> None:
        """This process stored an evaluation: count it without reading the study again."""
        if self._count is not None:
            self._count += 1

    def best_feasible(self, judge: Judge | None = None) -> TrialRecord | None:
        """The feasible record with the largest share; ties go to the lower loss, then the older."""
        feasible = [r for r in self.records(judge) if r.result.ok]
        if not feasible:
            return None
        return max(feasible, key=lambda r: (round(r.share, 12), -r.result.loss, -r.number))

    def pareto_front(self, judge: Judge | None = None) -> list[TrialRecord]:
        """Feasible records that no feasible record beats on both lower loss and larger share; by share.

        The same front as Optuna's ``study.best_trials`` of a multi-objective
        study, whose constraint keeps infeasible trials off it.
        """
        records = [r for r in self.records(judge) if r.result.ok]
        front = [
            r
            for r in records
            if not any(
                o.result.loss <= r.result.loss
                and o.share >= r.share
                and (o.result.loss < r.result.loss or o.share > r.share)
                for o in records
            )
        ]
        return sorted(front, key=lambda r: (r.share, r.number))

    # -- writing -----------------------------------------------------------
    def _decided_key(self, trial: FrozenTrial) -> tuple[bool, ...] | None:
        """The :meth:`key` of the config a trial holds or was queued with; None if incomplete."""
        fixed = trial.system_attrs.get("fixed_params", trial.params)
        if not all(name in fixed for name in self.layers):
            return None
        return tuple(fixed[name] == INT8 for name in self.layers)

    def pending(self, plan: Plan) -> TrialState | None:
        """WAITING or RUNNING when a queued or running trial already holds ``plan``."""
        wanted = self.key({name: plan[name] for name in self.layers})
        for trial in self.study.get_trials(
            deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)
        ):
            if self._decided_key(trial) == wanted:
                return trial.state
        return None

    def known_keys(self) -> set[tuple[bool, ...]]:
        """The configs stored, queued or being evaluated (as :meth:`key`), from one read of the study."""
        trials = self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
        )
        return {key for trial in trials if (key := self._decided_key(trial)) is not None}

    def enqueue(self, plan: Plan, source: str, checked: bool = False) -> None:
        """Queue ``plan`` for the next trial, unless it is already waiting or running.

        ``checked``: the caller has just seen that it is not (:meth:`pending`).
        The queued trial carries its source and fingerprint from its creation.
        """
        if checked or self.pending(plan) is None:
            attrs = {"source": source} | ({"fingerprint": self.fingerprint} if self.fingerprint else {})
            self.study.enqueue_trial(self.params(plan), user_attrs=attrs)

    def set_text(self, key: str, text: str, chunk: int = 30_000) -> None:
        """Store a long text in chunks small enough for every RDB backend's attribute column."""
        parts = [text[i : i + chunk] for i in range(0, len(text), chunk)] or [""]
        for index, part in enumerate(parts):
            self.study.set_user_attr(f"{key}.{index}", part)
        self.study.set_user_attr(f"{key}.parts", len(parts))

    def get_text(self, key: str) -> str | None:
        attrs = self.study.user_attrs
        count = attrs.get(f"{key}.parts")
        if not isinstance(count, int):
            return None
        parts = [attrs.get(f"{key}.{index}") for index in range(count)]
        if any(not isinstance(part, str) for part in parts):
            return None
        return "".join(parts)  # type: ignore[arg-type]

    def set_output_ranges(self, ranges: OutputRanges) -> None:
        """Publish the calibration output ranges (as JSON text: large models have many layers)."""
        self.set_text("output_ranges", json.dumps({name: [r.lo, r.hi] for name, r in ranges.items()}))

    def output_ranges(self) -> OutputRanges:
        """The calibration output ranges stored in the study; {} when it holds none."""
        text = self.get_text("output_ranges")
        try:
            stored = json.loads(text) if text is not None else {}
        except ValueError:
            return {}
        if not isinstance(stored, dict):
            return {}
        return {
            name: OutputRange(float(value[0]), float(value[1]))
            for name, value in stored.items()
            if isinstance(value, list) and len(value) == 2
        }

    def get_attr(self, key: str, default: Any = None) -> Any:
        return self.study.user_attrs.get(key, default)

    def set_attr(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)
