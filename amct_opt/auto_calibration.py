"""``accuracy_based_auto_calibration``: calibrate once, rank, search, export the final model.

The flow (each stage stored in the study, so a re-run resumes):

1. validate every argument, before the evaluator is first called;
2. evaluate the float model and check ``metric_eval(orig, orig)``;
3. calibrate once (the user's ``calibration()``, call 1);
4. evaluate the all-quantized model and stop if it meets the target;
5. rank the layers by sensitivity (``calibration()``, call 2);
6. run the strategy loop (:class:`amct_opt.search_loop.SearchLoop`);
7. export only the final model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .auto_calibration_setup import RunSetup, prepare_run
from .outputs import write_json, write_ranking
from .progress import SearchProgress
from .run_logging import log_to_file
from .search_loop import SearchLoop
from .sensitivity import score_layers
from .strategies.base import Proposal, SearchContext
from .trial_export import write_plan_outputs
from .trials import TrialRecord
from .types import EvalResult, Plan, Ranking

__all__ = ["AutoCalibrationResult", "accuracy_based_auto_calibration"]

logger = logging.getLogger("amct_opt")


@dataclass(frozen=True)
class AutoCalibrationResult:
    """What a run found; ``reachable`` is False when only the float model meets the target."""

    reachable: bool
    final_plan: dict[str, bool] | None
    float_metric: float
    all_quant_metric: float
    final_metric: float | None
    final_loss: float | None
    quantized_share: float
    layers_kept_float: list[str]
    evaluations: int
    evaluations_this_run: int
    calibration_calls: int
    stop_reason: str
    study_name: str
    storage: str
    paths: dict[str, str] = field(default_factory=dict)
    #: The feasible stored evaluations that no other beats on both lower loss and larger
    #: quantized share, by share: the trade-off a ``multi_objective`` search explores.
    pareto_front: list[TrialRecord] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"float metric        : {self.float_metric:.6g}",
            f"all-INT8 metric     : {self.all_quant_metric:.6g}",
        ]
        if self.reachable and self.final_plan is not None:
            n_int8 = sum(self.final_plan.values())
            lines += [
                f"chosen config metric: {self.final_metric:.6g} (loss {self.final_loss:.6g})",
                f"layers INT8         : {n_int8}/{len(self.final_plan)}, "
                f"quantized share {self.quantized_share:.1%}",
                f"layers kept float   : {', '.join(self.layers_kept_float) or '(none)'}",
            ]
        else:
            lines.append("no quantized config meets the target: loosen it and call again")
        if len(self.pareto_front) > 1:
            lines.append("Pareto front        : " + ", ".join(
                f"{r.share:.1%} at loss {r.result.loss:.3g} (trial {r.number})" for r in self.pareto_front
            ))
        lines += [
            f"evaluations         : {self.evaluations} in the study, {self.evaluations_this_run} this run",
            f"study               : {self.study_name!r} in {self.storage}",
        ]
        return "\n".join(lines)


def _rank(setup: RunSetup) -> Ranking:
    """Ranked by one worker (the setup lease holder), published in the study, reused by all.

    The ranking is stored with the name of the sensitivity that made it.  A
    re-run with another sensitivity ranks again (one ``calibration()`` call)
    and keeps the stored calibration and evaluations, which do not depend on it.
    """
    wanted = type(setup.sensitivity).__qualname__

    def stored() -> Ranking | None:
        scores = setup.study.get_attr("ranking")
        if (isinstance(scores, dict) and set(scores) == set(setup.layers)
                and setup.study.get_attr("ranking_sensitivity") == wanted):
            return Ranking({name: float(scores[name]) for name in setup.layers})
        return None

    def compute() -> Ranking:
        logger.info("ranking %d layers by %s sensitivity", len(setup.layers), wanted)
        ranking = score_layers(setup.qmodel, setup.runner.calibrate, setup.sensitivity)
        setup.study.set_attr("ranking", ranking.scores)
        setup.study.set_attr("ranking_sensitivity", wanted)
        return ranking

    previous = setup.study.get_attr("ranking_sensitivity")
    if isinstance(setup.study.get_attr("ranking"), dict) and previous not in (None, wanted):
        # The setup stages were done by an earlier run: no lease needed to rank again.
        logger.info(
            "the stored sensitivity ranking was made by %s, this run asks for %s: ranking again "
            "(the calibration and the stored evaluations are reused)", previous, wanted,
        )
        return compute()
    ranking, computed = setup.coordinator.once("sensitivity ranking", stored, compute)
    if not computed:
        logger.info("sensitivity ranking reused from the study")
    return ranking


def _write_history(setup: RunSetup) -> None:
    history = [
        {
            "trial": record.number,
            "roll_back_config": record.plan,
            "metric_eval": [record.result.ok, record.result.loss],
            "metric": record.result.metric,
            "quantized_share": record.share,
        }
        for record in setup.study.records(setup.judge)
    ]
    write_json(setup.paths.roll_back_record, history)


def _finish(setup: RunSetup, plan: Plan | None) -> tuple[bool, EvalResult | None]:
    """Export the final model, or remove stale quantized outputs when none is reachable."""
    paths = setup.paths
    if plan is None or not any(plan.values()):
        for stale in [*paths.quantized_outputs(), paths.fusion_info]:
            stale.unlink(missing_ok=True)
        logger.warning(
            "only the all-float model meets the target: no quantized model was written. "
            "The target may be too strict; loosen metric_eval's threshold and call again "
            "(stored evaluations are reused)."
        )
        return False, None
    write_plan_outputs(
        setup.qmodel, plan, paths, setup.inputs, setup.input_names, setup.output_names,
        setup.dynamic_axes, setup.config, setup.fusions,
    )
    record = setup.study.lookup(plan, setup.judge)
    return True, None if record is None else record.result


def accuracy_based_auto_calibration(
    model: nn.Module,
    model_evaluator: Any,
    config_file: str,
    record_file: str,
    save_dir: str,
    input_data: Any,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, Any] | None = None,
    strategy: Any = "BinarySearch",
    sensitivity: Any = "CosineSimilarity",
) -> AutoCalibrationResult:
    """Find the most-quantized INT8 config that meets the evaluator's target; export it.

    Args follow the reference (AMCT).  ``save_dir`` is a folder plus a file-name
    prefix (``results/mobilenet_v2``); ``strategy`` is ``"BinarySearch"``,
    ``"optuna"`` or an instance; ``sensitivity`` is ``"CosineSimilarity"``,
    ``"MSE"``, ``"KL"`` or a :class:`~amct_opt.sensitivity.SensitivityBase`.
    """
    setup = prepare_run(
        model, model_evaluator, config_file, record_file, save_dir, input_data,
        input_names, output_names, dynamic_axes, strategy, sensitivity,
    )
    try:
        with log_to_file(setup.paths.log_file, console=setup.search.show_progress):
            return _run(setup)
    finally:
        setup.coordinator.close()


def _run(setup: RunSetup) -> AutoCalibrationResult:
    search, study = setup.search, setup.study
    progress = SearchProgress(search.show_progress, search.n_trials, len(setup.layers))
    loop = SearchLoop(
        study, setup.evaluate, setup.judge, progress, fingerprint=setup.fingerprint,
        multi_objective=search.multi_objective, max_failures=search.max_failures,
        coordinator=setup.coordinator,
    )
    all_quant_plan = dict.fromkeys(setup.layers, True)
    try:
        answered = loop.answer(Proposal(all_quant_plan, "all_quant"))
        assert answered is not None  # no budget applies before the search
        all_quant = answered.result
        study.set_attr("all_quant_metric", all_quant.metric)
        logger.info("all-INT8 metric %.6g (loss %.6g): %s", all_quant.metric, all_quant.loss,
                    "meets the target" if all_quant.ok else "fails the target")
        stop_reason = "the all-INT8 model meets the target"
        final: Plan | None = all_quant_plan
        if not all_quant.ok:
            ranking = _rank(setup)
            write_ranking(setup.paths.ranking, ranking.as_pairs())
            history = [(r.plan, r.result) for r in study.records(setup.judge)]
            search.start(SearchContext(
                ranking.most_sensitive_first(), ranking, setup.costs, search.objective, all_quant, history,
            ))
            progress.budget = search.n_trials  # a strategy may set its default budget in start()
            if search.timeout is not None:
                progress.deadline = time.monotonic() + search.timeout
            outcome = loop.run(search)
            stop_reason = outcome.stop_reason
            final = outcome.final_plan
            if final is None:
                best = study.best_feasible(setup.judge)
                final = None if best is None else best.plan
    except KeyboardInterrupt:
        logger.warning("interrupted: every completed evaluation is stored; re-run the same call to resume")
        raise
    finally:
        _write_history(setup)
    reachable, final_result = _finish(setup, final)
    kept_float = [] if final is None else [name for name, on in final.items() if not on]
    result = AutoCalibrationResult(
        reachable=reachable,
        final_plan=dict(final) if reachable and final is not None else None,
        float_metric=setup.float_metric,
        all_quant_metric=float(all_quant.metric),
        final_metric=None if final_result is None else float(final_result.metric),
        final_loss=None if final_result is None else final_result.loss,
        quantized_share=study.share(final) if reachable and final is not None else 0.0,
        layers_kept_float=kept_float if reachable else list(setup.layers),
        evaluations=study.evaluated_count(),
        evaluations_this_run=loop.evaluations,
        calibration_calls=setup.runner.calibration_calls,
        stop_reason=stop_reason,
        study_name=study.study.study_name,
        storage=setup.storage_label,
        paths=setup.paths.as_dict(),
        pareto_front=study.pareto_front(setup.judge),
    )
    logger.info("auto calibration finished (%s)\n%s", stop_reason, result.summary())
    return result

