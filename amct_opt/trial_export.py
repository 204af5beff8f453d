"""Export any stored trial of a study, later, without re-running calibration or the search.

The study holds everything but the model: the calibration record (study
attribute ``record.*``), the searched layers and each trial's per-layer
params.  :func:`export_trial` rebuilds the quantized model from the user's
model and config exactly as the run did (same Conv+BN folding, same record),
switches it to the trial's plan and writes the same files as the run's final
export, through the same function (:func:`write_plan_outputs`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from . import __version__
from .config import QuantConfig
from .errors import ConfigError, InputError, StorageError
from .fusion import FusionPair, fold_conv_bn, fusion_info, pairs_to_fold
from .layers import find_quantizable_layers
from .outputs import OutputPaths, as_input_tuple, resolve_outputs, write_json
from .quant_model import QuantizedModel, build_quantized_model
from .record import record_from_text
from .storage import describe_storage, mask_secrets, open_storage
from .trials import SearchStudy
from .types import Plan

__all__ = ["TrialExport", "export_trial", "load_study", "write_plan_outputs"]

logger = logging.getLogger("amct_opt")

#: The fingerprint parts a trial's quantized model depends on.
_MODEL_PARTS = ("model weights", "quant config")


@dataclass(frozen=True)
class TrialExport:
    """What :func:`export_trial` wrote, and the plan it exported."""

    trial_number: int
    plan: dict[str, bool]
    deploy_model: Path
    fake_quant_model: Path
    final_config: Path
    fusion_info: Path


def write_plan_outputs(
    qmodel: QuantizedModel,
    plan: Plan,
    paths: OutputPaths,
    inputs: tuple[Any, ...],
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_axes: Mapping[str, Any] | None,
    config: QuantConfig,
    fusions: Sequence[FusionPair],
) -> None:
    """Switch ``qmodel`` to ``plan``; write both ONNX models, the final config and the fusion info."""
    from .export import export_models

    qmodel.set_plan(plan)
    export_models(
        qmodel, str(paths.directory / paths.prefix), inputs, input_names, output_names, dynamic_axes,  # type: ignore[arg-type]
    )
    write_json(paths.final_config, config.with_plan(plan).to_dict())
    write_json(paths.fusion_info, fusion_info(fusions, plan, __version__))


def load_study(storage: Any, study_name: str) -> optuna.Study:
    """The study ``study_name`` in ``storage``; a missing one is an :class:`InputError` naming those there."""
    if not isinstance(study_name, str) or not study_name:
        raise InputError(f"study_name: expected a non-empty string, got {study_name!r}")
    opened = open_storage(storage)
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(opened, include_best_trial=False)]
    except Exception as exc:  # noqa: BLE001 - any driver error means the storage is unusable
        raise StorageError(
            f"storage: cannot read {describe_storage(storage)}: {mask_secrets(str(exc))}"
        ) from None
    if study_name not in names:
        raise InputError(
            f"study_name: no study {study_name!r} in {describe_storage(storage)}; "
            f"it holds {names or 'no study'}"
        )
    return optuna.load_study(study_name=study_name, storage=opened)


def _completed_trial(study: optuna.Study, number: Any) -> FrozenTrial:
    if isinstance(number, bool) or not isinstance(number, int):
        raise InputError(f"trial_number: expected an int, got {number!r}")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        held = f"its trials are numbered 0..{max(trials)}" if trials else "it has no trial yet"
        raise InputError(f"trial_number: study {study.study_name!r} has no trial {number} ({held})")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise InputError(
            f"trial_number: trial {number} of study {study.study_name!r} is {trial.state.name}, "
            "not COMPLETE; only an evaluated trial can be exported"
        )
    return trial


def _check_fingerprint(study: optuna.Study, trial: FrozenTrial, model: nn.Module, config: QuantConfig,
                       inputs: tuple[Any, ...]) -> None:
    """Refuse a model or config other than the study's, or a trial made for an earlier one.

    Only the model weights and the quant config decide the quantized model; the
    input shapes and the sensitivity of the run do not, so they are not compared.
    """
    from .auto_calibration_setup import _fingerprint_parts

    stored = study.user_attrs.get("fingerprint_parts")
    if not isinstance(stored, dict):
        raise InputError(f"study_name: study {study.study_name!r} holds no fingerprint; it was not made by a search")
    parts = _fingerprint_parts(model, config, inputs)
    changed = [key for key in _MODEL_PARTS if stored.get(key) != parts[key]]
    if changed:
        raise InputError(
            f"model: the {' and the '.join(changed)} differ from those of study {study.study_name!r}; "
            "export a trial with the model and config_file the search ran with"
        )
    made_for = trial.user_attrs.get("fingerprint")
    if made_for is not None and made_for != study.user_attrs.get("fingerprint"):
        raise InputError(
            f"trial_number: trial {trial.number} was evaluated for an earlier model, config or input "
            f"shape of study {study.study_name!r} (fingerprint {made_for}); its calibration is gone"
        )


def export_trial(
    model: nn.Module,
    study_name: str,
    storage: Any,
    trial_number: int,
    save_dir: str | os.PathLike[str],
    input_data: Any,
    config_file: str | os.PathLike[str],
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
) -> TrialExport:
    """Write trial ``trial_number``'s deploy ONNX, fake-quant ONNX and final config.

    Args:
        model: the float model the search ran on (its weights must match the study's).
        study_name: the study (by default the run's output prefix).
        storage: its SQLAlchemy URL or Optuna storage.
        trial_number: a COMPLETE trial of the study.
        save_dir: folder plus file-name prefix of the outputs, as for the search.
        input_data: a tensor or tuple of tensors to trace with.
        config_file: the quant config the search ran with.
        input_names, output_names, dynamic_axes: as for ``torch.onnx.export``.

    Nothing is evaluated or calibrated: the calibration record is read from the study.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(input_data)
    config = QuantConfig.load(config_file, model_layers=list(find_quantizable_layers(model)))
    directory, prefix = Path(os.fspath(save_dir)).parent, Path(os.fspath(save_dir)).name
    paths = resolve_outputs(save_dir, directory / f"{prefix}_record.txt")
    from .export import check_dynamic_axes

    check_dynamic_axes(dynamic_axes, input_names, output_names)

    study = load_study(storage, study_name)
    trial = _completed_trial(study, trial_number)
    _check_fingerprint(study, trial, model, config, inputs)
    layers = study.user_attrs.get("layers")
    searched = SearchStudy(study, layers if isinstance(layers, list) else [], {})
    text = searched.get_text("record")
    if not isinstance(layers, list) or text is None:
        raise InputError(f"study_name: study {study.study_name!r} holds no calibration record to export from")
    if layers != config.enabled_layers():
        raise ConfigError(
            f"config_file: its enabled layers differ from the layers study {study.study_name!r} searched"
        )
    plan = searched.plan_of(trial)
    if plan is None:
        raise InputError(f"trial_number: trial {trial_number} holds no decision for every searched layer")
    if not any(plan.values()):
        raise InputError(f"trial_number: trial {trial_number} keeps every layer float; there is no quantized model")

    pairs = pairs_to_fold(model, config)
    qmodel = build_quantized_model(
        fold_conv_bn(model, pairs), record_from_text(text, "study record"), searched.output_ranges()
    )
    write_plan_outputs(qmodel, plan, paths, inputs, input_names, output_names, dynamic_axes, config, pairs)
    logger.info("exported trial %d of study %r to %s", trial_number, study.study_name, paths.directory)
    return TrialExport(
        trial_number, plan, paths.deploy_model, paths.fake_quant_model, paths.final_config, paths.fusion_info
    )
