"""Everything a search needs before its first step, each stage reused from the study when it can be.

:func:`prepare_run` validates every argument before the evaluator is first
called, opens the study, evaluates the float model (once per model and
config), calibrates (once per model and config) and builds the switchable
quantized model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from . import __version__
from .calibration import Calibration, calibrate_layers
from .config import QuantConfig
from .cost import measure_layer_costs
from .distributed import Coordinator
from .errors import AmctError, ConfigError, EvaluatorError, InputError, StorageError, UnsupportedModelError
from .evaluator import EvaluatorRunner
from .fingerprint import combine, model_fingerprint
from .fusion import FusionPair, fold_conv_bn, pairs_to_fold
from .layers import find_quantizable_layers
from .objectives import check_objective
from .outputs import NewFiles, OutputPaths, as_input_tuple, resolve_outputs
from .quant_model import NUMERICS, QuantizedModel, build_quantized_model
from .record import record_from_text, record_to_text, write_record
from .run_logging import log_to_file
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
    #: The leases this worker holds in the study; closed when the run ends.
    coordinator: Coordinator
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
    label = describe_storage(storage_arg)
    try:
        storage = open_storage(storage_arg)
    except OSError as exc:  # e.g. a sqlite:/// path under a regular file
        raise StorageError(f"storage: cannot open {label}: {exc}") from None
    name = search.study_name or paths.prefix
    sampler = search.study_sampler() or optuna.samplers.TPESampler(seed=search.seed)
    directions: list[optuna.study.StudyDirection] = (
        [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE]
        if search.multi_objective
        else [optuna.study.StudyDirection.MAXIMIZE]
    )
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
    """Evaluated by one worker (the setup lease holder), published in the study, reused by all."""

    def stored() -> float | None:
        value = setup.study.get_attr("float_metric")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def compute() -> float:
        metric = setup.runner.metric(model)
        logger.info("float metric %.6g", metric)
        setup.study.set_attr("float_metric", metric)
        return metric

    metric, computed = setup.coordinator.once("float metric", stored, compute)
    if not computed:
        logger.info("float metric %.6g reused from the study", metric)
    ok, loss = setup.runner.judge(metric, metric)
    if not ok:
        raise EvaluatorError(
            f"model_evaluator.metric_eval: metric_eval(orig, orig) with orig={metric!r} returned "
            f"(False, {loss!r}); the float model must meet its own target"
        )
    return metric


def _calibrate(setup: RunSetup, folded: nn.Module) -> QuantizedModel:
    """Calibrated by one worker (the setup lease holder), published in the study, reused by all."""

    def stored() -> Calibration | None:
        text = setup.study.get_text("record")
        record = None if text is None else record_from_text(text)
        if record is None or set(record) != set(setup.layers):
            return None
        return Calibration(record, setup.study.output_ranges())

    def compute() -> Calibration:
        logger.info("calibrating %d layers", len(setup.layers))
        calibration = calibrate_layers(folded, setup.config, setup.runner.calibrate)
        setup.study.set_output_ranges(calibration.output_ranges)
        setup.study.set_text("record", record_to_text(calibration.record))
        return calibration

    calibration, computed = setup.coordinator.once("calibration", stored, compute)
    if not computed:
        logger.info("calibration reused from the study (fingerprint %s)", setup.fingerprint)
    write_record(setup.paths.record_file, calibration.record)
    return build_quantized_model(folded, calibration.record, calibration.output_ranges)


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

    pairs = pairs_to_fold(model, config)
    folded = fold_conv_bn(model, pairs)
    try:
        costs = measure_layer_costs(folded, inputs)
    except Exception as exc:  # noqa: BLE001 - a forward failure means the input does not fit
        raise InputError(f"input_data: the model cannot run on it ({type(exc).__name__}: {exc})") from None

    storage_files = _sqlite_files(search.storage or default_storage_url(paths.directory))
    new_files = NewFiles([paths.record_file, paths.log_file, *storage_files])
    paths.remove_stale_temps()
    opened: list[optuna.Study] = []
    try:
        with log_to_file(paths.log_file, console=search.show_progress):
            return _start(model, runner, config, layers, paths, inputs, (input_names, output_names, dynamic_axes),
                          search, sens, pairs, folded, costs, opened)
    except AmctError:
        # Bad input found by the float evaluation or calibration: leave no partial outputs.
        # A new study file is kept only when another worker has started using it meanwhile.
        new_files.remove(keep=storage_files if opened and not _unused(opened[0]) else ())
        raise


def _sqlite_files(storage: Any) -> list[Path]:
    """The SQLite file of a ``sqlite:///`` URL, with its journal files; [] for other storages."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return []
    path = Path(storage[len("sqlite:///"):])
    return [path, *(path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm"))]


def _unused(study: optuna.Study) -> bool:
    """True when the study holds no trial and no other worker holds a lease in it."""
    leases = [key for key in study.user_attrs if key.startswith("lease:")]
    return not leases and not study.get_trials(deepcopy=False)


def _fingerprint_parts(model: nn.Module, config: QuantConfig, inputs: tuple[Any, ...]) -> dict[str, str]:
    """What the stored float metric, calibration and evaluations depend on, one short digest each.

    The sensitivity is not part of it: it decides only the ranking, which is
    stored with the sensitivity's name and recomputed alone when that changes.
    """
    return {
        "amct_opt version": __version__,
        "fake-quant numerics": NUMERICS,
        "model weights": combine(model_fingerprint(model)),
        "quant config": combine(config.fingerprint()),
        "input shapes": str([tuple(t.shape) for t in inputs]),
    }


def _check_fingerprint(study: optuna.Study, parts: dict[str, str], coordinator: Coordinator) -> str:
    """The run's fingerprint; a study made for another one has its stored stages cleared, saying why."""
    fingerprint = combine(*parts.values())
    stored = study.user_attrs.get("fingerprint")
    if stored != fingerprint:
        busy = [] if stored is None else coordinator.live_workers()
        if busy:
            raise StorageError(
                f"study_name: study {study.study_name!r} is being searched by worker(s) {', '.join(busy)} for "
                f"another model, config or input shape (fingerprint {stored}, this run {fingerprint}); "
                "choose another study_name"
            )
        if stored is not None:
            before = study.user_attrs.get("fingerprint_parts")
            changed = [k for k in parts if not isinstance(before, dict) or before.get(k) != parts[k]]
            changed = changed or ["fingerprint scheme (another amct_opt release)"]
            logger.info(
                "study %r was made for another run: the %s changed (fingerprint %s, now %s). "
                "Recomputing the float metric, calibration and ranking; earlier trials are kept "
                "but not reused", study.study_name, " and the ".join(changed), stored, fingerprint,
            )
        for key in ("float_metric", "all_quant_metric", "ranking", "ranking_sensitivity", "record.parts",
                    "output_ranges.parts"):
            if key in study.user_attrs:
                study.set_user_attr(key, None)
        study.set_user_attr("fingerprint_parts", parts)
        study.set_user_attr("fingerprint", fingerprint)
    return fingerprint


def _start(
    model: nn.Module, runner: EvaluatorRunner, config: QuantConfig, layers: list[str], paths: OutputPaths,
    inputs: tuple[Any, ...], names: tuple[Any, Any, Any], search: SearchStrategy, sens: SensitivityBase,
    pairs: list[FusionPair], folded: nn.Module, costs: dict[str, LayerCost], opened: list[optuna.Study],
) -> RunSetup:
    """Open the study (appended to ``opened``), then evaluate the float model and calibrate, or reuse both."""
    study, label = _open_study(search, paths)
    opened.append(study)
    coordinator = Coordinator(study)
    fingerprint = _check_fingerprint(study, _fingerprint_parts(model, config, inputs), coordinator)
    input_names, output_names, dynamic_axes = names
    setup = RunSetup(
        runner=runner, config=config, paths=paths, inputs=inputs,
        input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        search=search, sensitivity=sens,
        study=SearchStudy(study, layers, {n: costs[n] for n in layers}, search.objective, fingerprint),
        storage_label=label, fingerprint=fingerprint, layers=layers,
        costs=costs, fusions=pairs, qmodel=None,  # type: ignore[arg-type]
        coordinator=coordinator,
    )
    try:
        coordinator.join()
        setup.float_metric = _float_metric(setup, model)
        setup.qmodel = _calibrate(setup, folded)
    except BaseException:
        coordinator.close()  # another worker takes over at once
        raise
    study.set_user_attr("layers", layers)
    study.set_user_attr("costs", {n: [costs[n].macs, costs[n].params] for n in layers})
    return setup


