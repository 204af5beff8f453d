"""Issue 4: accuracy_based_auto_calibration end to end on SmallNet and real MNIST digits.

Measured on the session's trained SmallNet (DigitsEvaluator): the all-INT8 loss is
1.53e-4; BinarySearch over the CosineSimilarity ranking rolls back 4 layers
(loss 2.51e-4), then 6 (1.22e-4), then 5 (2.25e-4).  So a target of 1.3e-4
forces a roll-back and is reachable (one layer stays INT8), and 2e-5 is met by
the all-float model only.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import pytest
import torch
from conftest import DigitsEvaluator, Trained
from torch import nn

import amct_opt as amct
from amct_opt.fusion import fold_conv_bn
from amct_opt.quant_model import QuantLayer, build_quantized_model
from amct_opt.record import read_record
from amct_opt.strategies import AutoCalibrationStrategyBase, BinarySearch
from amct_opt.trials import SearchStudy

pytestmark = pytest.mark.slow

ROLL_BACK_TARGET = 1.3e-4
UNREACHABLE_TARGET = 2e-5
LAYERS = ["conv1", "conv2", "dw", "pw", "conv3", "fc1", "fc2"]
OUT_FILES = {
    "net_fake_quant_model.onnx",
    "net_deploy_model.onnx",
    "net_quant.json",
    "accuracy_based_auto_calibration_final_config.json",
    "accuracy_based_auto_calibration_ranking_information.json",
    "amct_opt.db",
}
LOG_FILES = {"accuracy_based_auto_calibration_record.json", "amct_onnx.log"}


class PlanLog(DigitsEvaluator):
    """Remembers the plan of every evaluate() that returned (None for the float model);
    raises ``interrupt`` on call number ``crash_at``."""

    def __init__(self, data: Trained, target: float, crash_at: int | None = None) -> None:
        super().__init__(data, target)
        self.crash_at = crash_at
        self.evaluated: list[tuple[tuple[str, bool], ...] | None] = []

    def evaluate(self, model: nn.Module) -> float:
        if self.crash_at is not None and self.evaluate_calls + 1 == self.crash_at:
            self.evaluate_calls += 1
            raise KeyboardInterrupt
        metric = super().evaluate(model)
        plan = getattr(model, "plan", None)
        self.evaluated.append(None if plan is None else tuple(sorted(plan.items())))
        return metric


@dataclass
class Run:
    root: Path
    result: amct.AutoCalibrationResult
    evaluator: PlanLog


def call(root: Path, model: nn.Module, evaluator: Any, **kwargs: Any) -> amct.AutoCalibrationResult:
    """The seed call with the run's paths under ``root`` (the working directory, for amct_log/)."""
    with contextlib.chdir(root):
        return amct.accuracy_based_auto_calibration(
            model, evaluator, str(root / "quant.json"), str(root / "record.txt"), str(root / "out" / "net"),
            torch.zeros(1, 1, 28, 28), **kwargs,
        )


def new_root(tmp: Path, model: nn.Module) -> Path:
    amct.create_quant_config(str(tmp / "quant.json"), model, torch.zeros(1, 1, 28, 28), batch_num=2)
    return tmp


def copy_root(run: Run, tmp: Path) -> Path:
    target = tmp / "copy"
    shutil.copytree(run.root, target)
    return target


@pytest.fixture(scope="module")
def roll_back(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Run:
    before = copy.deepcopy(trained.model.state_dict())
    root = new_root(tmp_path_factory.mktemp("roll_back"), trained.model)
    evaluator = PlanLog(trained, ROLL_BACK_TARGET)
    result = call(root, trained.model, evaluator, input_names=["image"], output_names=["logits"],
                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    after = trained.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the user's model was changed"
    assert not trained.model.training and isinstance(trained.model.bn1, nn.BatchNorm2d)
    assert not any(isinstance(m, QuantLayer) for m in trained.model.modules())
    return Run(root, result, evaluator)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_seed_signature_and_the_evaluator_base() -> None:
    parameters = inspect.signature(amct.accuracy_based_auto_calibration).parameters
    assert [(p.name, p.default) for p in parameters.values()] == [
        ("model", inspect.Parameter.empty), ("model_evaluator", inspect.Parameter.empty),
        ("config_file", inspect.Parameter.empty), ("record_file", inspect.Parameter.empty),
        ("save_dir", inspect.Parameter.empty), ("input_data", inspect.Parameter.empty),
        ("input_names", None), ("output_names", None), ("dynamic_axes", None),
        ("strategy", "BinarySearch"), ("sensitivity", "CosineSimilarity"),
    ]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters.values())
    assert amct.AutoCalibrationEvaluatorBase.__abstractmethods__ == {"calibration", "evaluate", "metric_eval"}
    assert list(inspect.signature(amct.AutoCalibrationEvaluatorBase.metric_eval).parameters) == [
        "self", "original_metric", "new_metric"]


def test_full_flow_writes_every_output_with_the_exact_names(roll_back: Run) -> None:
    root, result = roll_back.root, roll_back.result
    assert {p.name for p in (root / "out").iterdir()} == OUT_FILES
    assert {p.name for p in (root / "amct_log").iterdir()} == LOG_FILES
    assert result.paths["deploy_model"] == str(root / "out" / "net_deploy_model.onnx")

    # The roll-back happened and the chosen config meets the target.
    assert result.reachable
    assert result.all_quant_metric != result.float_metric
    assert abs(result.all_quant_metric - result.float_metric) >= ROLL_BACK_TARGET
    assert result.final_loss is not None and result.final_loss < ROLL_BACK_TARGET
    n_int8 = sum(result.final_plan.values())
    assert 0 < n_int8 < len(LAYERS)
    assert sorted(result.layers_kept_float) == sorted(n for n, on in result.final_plan.items() if not on)
    assert 0.0 < result.quantized_share < 1.0

    # Ranking: [[layer, score], ...] ascending.
    ranking = read_json(root / "out" / "accuracy_based_auto_calibration_ranking_information.json")
    assert sorted(name for name, _ in ranking) == sorted(LAYERS)
    scores = [score for _, score in ranking]
    assert scores == sorted(scores) and all(0.0 <= s <= 1.0 for s in scores)

    # The final config is the user's, with quant_enable following the result.
    original = read_json(root / "quant.json")
    final = read_json(root / "out" / "accuracy_based_auto_calibration_final_config.json")
    for name in LAYERS:
        assert final[name]["quant_enable"] is result.final_plan[name]
        assert {k: v for k, v in final[name].items() if k != "quant_enable"} == {
            k: v for k, v in original[name].items() if k != "quant_enable"
        }
    assert final["batch_num"] == original["batch_num"] == 2

    # The record file reads back with factors for every layer.
    record = read_record(root / "record.txt")
    assert set(record) == set(LAYERS)
    assert all(f.scale_d > 0 and all(s > 0 for s in f.scale_w) for f in record.values())

    # The roll-back history is valid JSON, one entry per evaluation, starting all-INT8.
    history = read_json(root / "amct_log" / "accuracy_based_auto_calibration_record.json")
    assert len(history) == result.evaluations
    assert history[0]["roll_back_config"] == dict.fromkeys(LAYERS, True)
    assert history[0]["metric_eval"][0] is False
    assert all(set(step["roll_back_config"]) == set(LAYERS) for step in history)
    assert any(step["roll_back_config"] == result.final_plan and step["metric_eval"][0] for step in history)

    # The fusion info names the folded Conv+BN pairs and the layers kept float.
    fusion = read_json(root / "out" / "net_quant.json")
    assert sorted(pair["layer"] for pair in fusion["fusions"]) == ["conv1", "conv2"]
    assert sorted(fusion["float_layers"]) == sorted(result.layers_kept_float)
    log = (root / "amct_log" / "amct_onnx.log").read_text()
    assert "auto calibration finished" in log
    assert "[eval 2] trial 1:" in log and "best feasible" in log  # progress lines, on by default
    assert log.count("net_fake_quant_model.onnx and") == 1  # one export, after the search
    assert log.index("search stopped") < log.index("net_fake_quant_model.onnx and")


def test_exported_models_load_and_agree_with_the_float_model(roll_back: Run, trained: Trained) -> None:
    batch = trained.test_x[:256]
    with torch.no_grad():
        want = trained.model(batch).argmax(1).numpy()
    for name in ("net_fake_quant_model.onnx", "net_deploy_model.onnx"):
        path = roll_back.root / "out" / name
        onnx.checker.check_model(onnx.load(str(path)))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        got = session.run(None, {"image": batch.numpy()})[0].argmax(1)
        assert np.mean(got == want) > 0.97, name


def test_every_evaluation_is_a_trial_with_its_attributes(roll_back: Run) -> None:
    storage = f"sqlite:///{roll_back.root / 'out' / 'amct_opt.db'}"
    assert roll_back.result.study_name == "net"
    study = optuna.load_study(study_name="net", storage=storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == roll_back.result.evaluations
    for trial in trials:
        assert set(trial.params) == set(LAYERS)
        assert set(trial.params.values()) <= {"int8", "float"}
        attrs = trial.user_attrs
        assert {"metric", "loss", "ok", "n_quantized", "quant_share_macs"} <= set(attrs)
        assert attrs["n_quantized"] == sum(v == "int8" for v in trial.params.values())
        assert attrs["ok"] == (attrs["loss"] < ROLL_BACK_TARGET)


def test_binary_search_cost_bound_and_calibration_count(roll_back: Run) -> None:
    result, evaluator = roll_back.result, roll_back.evaluator
    assert result.evaluations - 1 <= math.floor(math.log2(len(LAYERS))) + 2
    assert evaluator.calibration_calls == result.calibration_calls == 2
    # The deploy export's output ranges come from that same calibration pass, stored in the study.
    study = optuna.load_study(study_name="net", storage=f"sqlite:///{roll_back.root / 'out' / 'amct_opt.db'}")
    ranges = SearchStudy(study, LAYERS, {}).output_ranges()
    assert set(ranges) == set(LAYERS) and all(r.lo <= 0.0 <= r.hi and r.hi > r.lo for r in ranges.values())
    # One float evaluation, then one per stored trial (an all-float trial reuses the float metric).
    quantized = [plan for plan in evaluator.evaluated if plan is not None]
    assert evaluator.evaluated.count(None) == 1
    assert len(quantized) == len(set(quantized)) <= result.evaluations


def test_all_int8_meeting_the_target_stops_at_once(trained: Trained, tmp_path: Path) -> None:
    root = new_root(tmp_path, trained.model)
    evaluator = PlanLog(trained, target=1.0)
    result = call(root, trained.model, evaluator)
    assert result.reachable and result.final_plan == dict.fromkeys(LAYERS, True)
    assert result.evaluations == 1 and evaluator.evaluate_calls == 2
    assert evaluator.calibration_calls == 1  # no sensitivity pass
    assert not (root / "out" / "accuracy_based_auto_calibration_ranking_information.json").exists()
    final = read_json(root / "out" / "accuracy_based_auto_calibration_final_config.json")
    assert all(final[name]["quant_enable"] for name in LAYERS)


def test_unreachable_target_removes_stale_outputs_and_reuses_every_evaluation(
    roll_back: Run, trained: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = copy_root(roll_back, tmp_path)
    stale = [root / "out" / name for name in ("net_fake_quant_model.onnx", "net_deploy_model.onnx",
                                              "accuracy_based_auto_calibration_final_config.json")]
    assert all(path.exists() for path in stale)
    evaluator = PlanLog(trained, UNREACHABLE_TARGET)
    with caplog.at_level(logging.INFO, logger="amct_opt"):
        result = call(root, trained.model, evaluator)
    assert not result.reachable and result.final_plan is None and result.final_metric is None
    assert sorted(result.layers_kept_float) == sorted(LAYERS)
    assert not any(path.exists() for path in stale)
    assert not (root / "out" / "net_quant.json").exists()
    assert "loosen" in caplog.text and "loosen" in (root / "amct_log" / "amct_onnx.log").read_text()
    assert "loosen" in result.summary()
    # The stricter target is judged on the stored metrics: nothing stored is evaluated or calibrated
    # again (the search may take a new path under the new target, and evaluate configs new to it).
    assert evaluator.calibration_calls == 0 and None not in evaluator.evaluated
    assert not set(evaluator.evaluated) & set(roll_back.evaluator.evaluated)
    history = read_json(root / "amct_log" / "accuracy_based_auto_calibration_record.json")
    assert len(history) == result.evaluations and not any(step["metric_eval"][0] for step in history[:-1])


class GreedyRollBack(AutoCalibrationStrategyBase):
    """A strategy in the reference's style: roll back the most sensitive layers one more at a time."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.ranking: dict[str, float] = {}
        self.order: list[str] = []
        self.results: list[tuple[bool, float]] = []
        self.proposed: list[dict[str, bool]] = []
        self.final: dict[str, bool] | None = None

    def initialize(self, ranking: dict[str, float]) -> None:
        self.ranking = dict(ranking)
        self.order = sorted(ranking, key=lambda name: ranking[name])

    def update_quant_config(self, metric_eval_result: tuple[bool, float]) -> dict[str, Any]:
        self.results.append((bool(metric_eval_result[0]), float(metric_eval_result[1])))
        step = len(self.results) - 1
        if metric_eval_result[0]:
            self.final = self.proposed[-1] if self.proposed else dict.fromkeys(self.order, True)
            return {"stop_flag": True, "roll_back_config": self.final}
        if step == self.max_steps:
            return {"stop_flag": True, "roll_back_config": None}
        config = {name: index > step for index, name in enumerate(self.order)}
        self.proposed.append(config)
        return {"stop_flag": False, "roll_back_config": config}


class WorstChannelGap(amct.SensitivityBase):
    """A custom sensitivity: 1 / (1 + largest absolute gap relative to the largest output)."""

    def __init__(self) -> None:
        self.calls = 0

    def compare(self, float_out: torch.Tensor, quant_out: torch.Tensor) -> float:
        self.calls += 1
        gap = (float_out - quant_out).abs().max() / float_out.abs().max().clamp_min(1e-12)
        return float(1.0 / (1.0 + gap))


def test_custom_strategy_and_sensitivity_instances(trained: Trained, tmp_path: Path) -> None:
    root = new_root(tmp_path, trained.model)
    strategy, sensitivity = GreedyRollBack(max_steps=2), WorstChannelGap()
    evaluator = PlanLog(trained, ROLL_BACK_TARGET)
    result = call(root, trained.model, evaluator, strategy=strategy, sensitivity=sensitivity)

    # The sensitivity scored every layer on each calibration batch, in one pass.
    assert sensitivity.calls == len(LAYERS) * evaluator.batch_num
    assert evaluator.calibration_calls == 2
    ranking = read_json(root / "out" / "accuracy_based_auto_calibration_ranking_information.json")
    assert {name: score for name, score in ranking} == strategy.ranking
    assert [score for _, score in ranking] == sorted(strategy.ranking.values())

    # The strategy was driven by the reference protocol: first the all-INT8 result, then its own configs.
    assert strategy.results[0][0] is False
    assert len(strategy.proposed) <= 2 and len(strategy.results) == len(strategy.proposed) + 1
    study = optuna.load_study(study_name="net", storage=f"sqlite:///{root / 'out' / 'amct_opt.db'}")
    plans = [{n: v == "int8" for n, v in t.params.items()} for t in study.trials]
    assert plans[1:] == strategy.proposed
    assert all(t.user_attrs["source"] == "GreedyRollBack" for t in study.trials[1:])
    if strategy.final is None:
        assert not result.reachable
    else:
        assert result.reachable and result.final_plan == strategy.final


def test_resume_after_an_interrupted_evaluation_repeats_nothing(roll_back: Run, trained: Trained, tmp_path: Path) -> None:
    root = new_root(tmp_path, trained.model)
    first = PlanLog(trained, ROLL_BACK_TARGET, crash_at=3)  # float, all-INT8, then the first roll-back
    with pytest.raises(KeyboardInterrupt):
        call(root, trained.model, first)
    study = optuna.load_study(study_name="net", storage=f"sqlite:///{root / 'out' / 'amct_opt.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    history = read_json(root / "amct_log" / "accuracy_based_auto_calibration_record.json")
    assert len(history) == 1  # written on the way out, valid JSON

    second = PlanLog(trained, ROLL_BACK_TARGET)
    result = call(root, trained.model, second)
    assert None not in second.evaluated  # the float evaluation is not repeated
    assert second.calibration_calls == 0  # calibration and ranking are reused
    completed = [plan for plan in first.evaluated + second.evaluated if plan is not None]
    assert len(completed) == len(set(completed))
    assert result.final_plan == roll_back.result.final_plan
    assert result.evaluations == roll_back.result.evaluations
    assert result.evaluations_this_run == roll_back.result.evaluations - 1


def change_weight(root: Path, model: nn.Module) -> None:
    with torch.no_grad():
        model.fc2.weight[0, 0] += 0.5


def change_config(root: Path, model: nn.Module) -> None:
    config = read_json(root / "quant.json")
    config["fc2"]["activation_quant_params"]["search_step"] = 0.02
    (root / "quant.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("change", "reason", "unchanged"), [
    (change_weight, "the model weights changed", "quant config"),
    (change_config, "the quant config changed", "model weights"),
])
def test_a_changed_weight_or_config_recomputes_everything_and_says_why(
    roll_back: Run, trained: Trained, tmp_path: Path, change: Any, reason: str, unchanged: str
) -> None:
    root = copy_root(roll_back, tmp_path)
    model = copy.deepcopy(trained.model)
    change(root, model)
    old_record = read_record(root / "record.txt")
    evaluator = PlanLog(trained, ROLL_BACK_TARGET)
    result = call(root, model, evaluator)
    log = (root / "amct_log" / "amct_onnx.log").read_text()
    assert reason in log and f"{unchanged} changed" not in log
    assert evaluator.evaluated[0] is None  # the float model is evaluated again
    assert log.index(reason) < log.rindex("calibrating 7 layers")  # calibrated again (and ranked if needed)
    assert evaluator.calibration_calls == (1 if result.stop_reason.startswith("the all-INT8 model meets") else 2)
    assert result.evaluations == result.evaluations_this_run  # earlier trials are not reused
    if change is change_weight:
        assert read_record(root / "record.txt")["fc2"] != old_record["fc2"]  # recalibrated and overwritten


def test_another_sensitivity_ranks_again_and_reuses_the_rest(
    roll_back: Run, trained: Trained, tmp_path: Path
) -> None:
    root = copy_root(roll_back, tmp_path)
    cosine = read_json(root / "out" / "accuracy_based_auto_calibration_ranking_information.json")
    evaluator = PlanLog(trained, ROLL_BACK_TARGET)
    result = call(root, trained.model, evaluator, sensitivity="MSE")
    log = (root / "amct_log" / "amct_onnx.log").read_text()
    assert "made by CosineSimilarity, this run asks for MseSensitivity: ranking again" in log
    assert "changed (fingerprint" not in log
    assert evaluator.calibration_calls == 1  # the ranking pass only: the calibration is reused
    assert None not in evaluator.evaluated  # so is the float metric
    assert not set(evaluator.evaluated) & set(roll_back.evaluator.evaluated)  # and every stored evaluation
    assert result.evaluations - result.evaluations_this_run == roll_back.result.evaluations
    mse = read_json(root / "out" / "accuracy_based_auto_calibration_ranking_information.json")
    assert dict(mse) != dict(cosine) and sorted(dict(mse)) == sorted(LAYERS)
    study = optuna.load_study(study_name="net", storage=f"sqlite:///{root / 'out' / 'amct_opt.db'}")
    assert study.user_attrs["ranking_sensitivity"] == "MseSensitivity"
    assert study.user_attrs["ranking"] == dict(mse)
    # Back to the first sensitivity: ranked again, nothing else.
    again = PlanLog(trained, ROLL_BACK_TARGET)
    back = call(root, trained.model, again)
    assert again.calibration_calls == 1 and again.evaluated == []
    assert back.final_plan == roll_back.result.final_plan


class TwiceAndFunctional(nn.Module):
    """One Linear called twice, and a conv through F.conv2d with the model's own Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 1, 3, 3) * 0.3)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(nn.functional.conv2d(x, self.kernel, padding=1))
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        return self.fc(torch.relu(self.fc(x)))


class NoiseEvaluator(amct.AutoCalibrationEvaluatorBase):
    def __init__(self) -> None:
        self.data = torch.randn(4, 8, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def calibration(self, model: nn.Module) -> None:
        for x in self.data[:2]:
            model(x)

    def evaluate(self, model: nn.Module) -> float:
        return float(sum(model(x).square().mean() for x in self.data))

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        return True, abs(original_metric - new_metric)


def test_a_module_called_twice_and_a_functional_conv(tmp_path: Path) -> None:
    """The functional conv stays float (it is not a module); both calls of ``fc`` are quantized."""
    torch.manual_seed(0)
    model = TwiceAndFunctional().eval()
    amct.create_quant_config(str(tmp_path / "quant.json"), model, torch.zeros(1, 1, 8, 8), batch_num=2)
    with contextlib.chdir(tmp_path):
        result = amct.accuracy_based_auto_calibration(
            model, NoiseEvaluator(), "quant.json", "record.txt", "out/net", torch.zeros(1, 1, 8, 8),
            input_names=["x"], dynamic_axes={"x": {0: "n"}})
    assert result.final_plan == {"conv": True, "fc": True}
    record = read_record(tmp_path / "record.txt")
    assert set(record) == {"conv", "fc"}
    # With the study's output ranges, as the export had them: "conv" simulates its output requantizer.
    study = optuna.load_study(study_name="net", storage=f"sqlite:///{tmp_path / 'out' / 'amct_opt.db'}")
    ranges = SearchStudy(study, ["conv", "fc"], {}).output_ranges()
    qmodel = build_quantized_model(fold_conv_bn(model, []), record, ranges)
    assert qmodel.layer("conv").requant is not None
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = qmodel(x)
        fc = qmodel.layer("fc")
        hidden = nn.functional.adaptive_avg_pool2d(
            torch.relu(qmodel.layer("conv").quant_forward(torch.relu(nn.functional.conv2d(x, model.kernel, padding=1)))), 2
        ).flatten(1)
        assert torch.equal(want, fc.quant_forward(torch.relu(fc.quant_forward(hidden))))
    session = ort.InferenceSession(str(tmp_path / "out" / "net_fake_quant_model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_binary_search_takes_any_sqlalchemy_url_study_name_and_progress_flag(
    roll_back: Run, trained: Trained, tmp_path: Path
) -> None:
    root = new_root(tmp_path, trained.model)
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'searches.db'}"
    (tmp_path / "elsewhere").mkdir()
    result = call(root, trained.model, PlanLog(trained, ROLL_BACK_TARGET),
                  strategy=BinarySearch(storage=url, study_name="mnist-bs", show_progress=False))
    assert "[eval " not in (root / "amct_log" / "amct_onnx.log").read_text()  # progress off
    assert result.final_plan == roll_back.result.final_plan
    assert result.study_name == "mnist-bs" and result.storage == url
    assert not (root / "out" / "amct_opt.db").exists()
    study = optuna.load_study(study_name="mnist-bs", storage=url)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == result.evaluations


@pytest.mark.parametrize(("kwargs", "named"), [({"storage": 3}, "storage"), ({"study_name": ""}, "study_name")])
def test_binary_search_rejects_a_bad_storage_or_study_name(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(amct.StrategyError, match=f"^{named}: expected"):
        BinarySearch(**kwargs)
