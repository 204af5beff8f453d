"""Everything a search needs before its first step, each stage reused from the study when it can be.

:func:`prepare_run` validates every argument before the evaluator is first
called, opens the study, evaluates the float model (once per model and
config), calibrates (once per model and config) and builds the switchable
quantized model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import optuna
from torch import nn

from . import __version__
from .calibration import calibrate
from .config import QuantConfig
from .cost import measure_layer_costs
from .errors import ConfigError, EvaluatorError, InputError, StorageError, UnsupportedModelError
from .evaluator import EvaluatorRunner
from .fingerprint import combine, model_fingerprint
from .fusion import FusionPair, find_conv_bn_pairs, fold_conv_bn
from .layers import find_quantizable_layers
from .objectives import check_objective
from .outputs import OutputPaths, as_input_tuple, resolve_outputs
from .quant_model import QuantizedModel, build_quantized_model
from .record import record_from_text, record_to_text, write_record
from .sensitivity import SensitivityBase, resolve_sensitivity
from .storage import default_storage_url, describe_storage, mask_secrets, open_storage
from .strategies import SearchStrategy, resolve_strategy
from .trials import SearchStudy
from .types import EvalResult, LayerCost, Plan

__all__ = ["RunSetup", "prepare_run", "validate_dynamic_axes"]

logger = logging.getLogger("amct_opt")


@dataclass
class RunSetup:
    """The validated arguments and the prepared, calibrated state of one run."""

    runner: EvaluatorRunner
    config: QuantConfig
    paths: OutputPaths
    inputs: tuple[Any, ...]
    input_names: list[str] | None
    output_names: list[str] | None
    dynamic_axes: dict[str, Any] | None
    search: SearchStrategy
    sensitivity: SensitivityBase
    study: SearchStudy
    storage_label: str
    fingerprint: str
    layers: list[str]
    costs: dict[str, LayerCost]
    fusions: list[FusionPair]
    qmodel: QuantizedModel
    float_metric: float = 0.0

    def judge(self, metric: float) -> tuple[bool, float]:
        return self.runner.judge(self.float_metric, metric)

    def evaluate(self, plan: Plan) -> EvalResult:
        """Evaluate a plan; the all-float plan is answered by the float metric."""
        if not any(plan.values()):
            ok, loss = self.judge(self.float_metric)
            return EvalResult(self.float_metric, ok, loss)
        self.qmodel.set_plan(plan)
        return self.runner.evaluate(self.qmodel, self.float_metric)


def validate_dynamic_axes(dynamic_axes: Any, input_names: Any, output_names: Any) -> None:
    from .export import check_dynamic_axes

    check_dynamic_axes(dynamic_axes, input_names, output_names)


def _open_study(search: SearchStrategy, paths: OutputPaths) -> tuple[optuna.Study, str]:
    storage_arg = search.storage or default_storage_url(paths.directory)
    storage = open_storage(storage_arg)
    label = describe_storage(storage_arg)
    name = search.study_name or paths.prefix
    sampler = search.study_sampler() or optuna.samplers.TPESampler(seed=search.seed)
    directions = ["minimize", "maximize"] if search.multi_objective else ["maximize"]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, directions=directions, sampler=sampler, load_if_exists=True
        )
    except Exception as exc:  # noqa: BLE001 - any driver error means the storage is unusable
        raise StorageError(f"storage: cannot open study {name!r} in {label}: {mask_secrets(str(exc))}") from None
    finally:
        optuna.logging.set_verbosity(verbosity)
    wanted = [optuna.study.StudyDirection.MINIMIZE] * search.multi_objective + [optuna.study.StudyDirection.MAXIMIZE]
    if list(study.directions) != wanted:
        raise StorageError(
            f"study_name: study {name!r} in {label} has directions "
            f"{[d.name for d in study.directions]}, expected {[d.name for d in wanted]}; "
            "choose another study_name"
        )
    return study, label


def _float_metric(setup: RunSetup, model: nn.Module) -> float:
    stored = setup.study.get_attr("float_metric")
    if isinstance(stored, (int, float)):
        logger.info("float metric %.6g reused from the study", stored)
        metric = float(stored)
    else:
        metric = setup.runner.metric(model)
        logger.info("float metric %.6g", metric)
    ok, loss = setup.runner.judge(metric, metric)
    if not ok:
        raise EvaluatorError(
            f"model_evaluator.metric_eval: metric_eval(orig, orig) with orig={metric!r} returned "
            f"(False, {loss!r}); the float model must meet its own target"
        )
    setup.study.set_attr("float_metric", metric)
    return metric


def _calibrate(setup: RunSetup, folded: nn.Module) -> QuantizedModel:
    text = setup.study.get_text("record")
    if text is not None:
        record = record_from_text(text)
        if set(record) == set(setup.layers):
            logger.info("calibration reused from the study (fingerprint %s)", setup.fingerprint)
            write_record(setup.paths.record_file, record)
            return build_quantized_model(folded, record)
    logger.info("calibrating %d layers", len(setup.layers))
    record = calibrate(folded, setup.config, setup.runner.calibrate)
    write_record(setup.paths.record_file, record)
    setup.study.set_text("record", record_to_text(record))
    return build_quantized_model(folded, record)


def prepare_run(
    model: Any, model_evaluator: Any, config_file: Any, record_file: Any, save_dir: Any,
    input_data: Any, input_names: Any, output_names: Any, dynamic_axes: Any, strategy: Any,
    sensitivity: Any,
) -> RunSetup:
    """Validate, open the study, evaluate the float model once, calibrate once."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    runner = EvaluatorRunner(model_evaluator)
    all_layers = find_quantizable_layers(model)
    if not all_layers:
        raise UnsupportedModelError(
            "model: no quantizable layer (Conv1d/2d/3d, ConvTranspose1d/2d, Linear) found"
        )
    config = QuantConfig.load(config_file, model_layers=list(all_layers))
    layers = config.enabled_layers()
    if not layers:
        raise ConfigError(f"config_file: no layer of {str(config_file)!r} has quant_enable true")
    paths = resolve_outputs(save_dir, record_file)
    inputs = as_input_tuple(input_data)
    validate_dynamic_axes(dynamic_axes, input_names, output_names)
    search = resolve_strategy(strategy)
    check_objective(search.objective)
    sens = resolve_sensitivity(sensitivity)

    pairs = find_conv_bn_pairs(model) if config.do_fusion else []
    pairs = [p for p in pairs if p.conv not in config.skip_fusion_layers]
    folded = fold_conv_bn(model, pairs)
    try:
        costs = measure_layer_costs(folded, inputs)
    except Exception as exc:  # noqa: BLE001 - a forward failure means the input does not fit
        raise InputError(f"input_data: the model cannot run on it ({type(exc).__name__}: {exc})") from None

    study, label = _open_study(search, paths)
    fingerprint = combine(
        __version__, model_fingerprint(model), config.fingerprint(),
        [tuple(t.shape) for t in inputs], type(sens).__qualname__,
    )
    stored = study.user_attrs.get("fingerprint")
    if stored != fingerprint:
        if stored is not None:
            logger.info(
                "study %r was made for another model, config or input shape (fingerprint %s, now "
                "%s): recomputing the float metric, calibration and ranking; its earlier trials "
                "are kept but not reused", study.study_name, stored, fingerprint,
            )
        for key in ("float_metric", "all_quant_metric", "ranking", "record.parts"):
            if key in study.user_attrs:
                study.set_user_attr(key, None)
        study.set_user_attr("fingerprint", fingerprint)
    setup = RunSetup(
        runner=runner, config=config, paths=paths, inputs=inputs,
        input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        search=search, sensitivity=sens,
        study=SearchStudy(study, layers, {n: costs[n] for n in layers}, search.objective, fingerprint),
        storage_label=label, fingerprint=fingerprint, layers=layers,
        costs=costs, fusions=pairs, qmodel=None,  # type: ignore[arg-type]
    )
    setup.float_metric = _float_metric(setup, model)
    setup.qmodel = _calibrate(setup, folded)
    study.set_user_attr("layers", layers)
    study.set_user_attr("costs", {n: [costs[n].macs, costs[n].params] for n in layers})
    return setup


