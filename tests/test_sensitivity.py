"""Sensitivity: the built-in scores on hand-made tensors, and the one-pass layer ranking."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from amct_opt.calibration import calibrate
from amct_opt.config import QuantConfig
from amct_opt.errors import StrategyError
from amct_opt.fusion import fold_conv_bn
from amct_opt.quant_model import QuantizedModel, build_quantized_model
from amct_opt.sensitivity import (
    CosineSimilarity,
    KLSensitivity,
    MseSensitivity,
    SensitivityBase,
    resolve_sensitivity,
    score_layers,
)

T = torch.tensor


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1.0, 0.0], [1.0, 0.0], 1.0),
        ([1.0, 0.0], [0.0, 1.0], 0.5),
        ([1.0, 2.0], [-1.0, -2.0], 0.0),
        ([1.0, 1.0], [1.0, 0.0], 0.5 + 0.5 / math.sqrt(2)),
        ([[3.0, 0.0], [0.0, 4.0]], [[6.0, 0.0], [0.0, 8.0]], 1.0),  # scale-free, flattened
    ],
)
def test_cosine_similarity_is_half_plus_half_cos(a: list, b: list, expected: float) -> None:
    assert CosineSimilarity().compare(T(a), T(b)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], 1.0),
        ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], 0.5),  # mse 1, power 1
        ([2.0, 0.0], [1.0, 0.0], 1.0 / (1.0 + 0.5 / 2.0)),  # mse 0.5, power 2
        ([0.0, 0.0], [1.0, 1.0], 1.0 / (1.0 + 1.0 / 1e-12)),  # a silent layer: power clamped
    ],
)
def test_mse_sensitivity_is_one_over_one_plus_relative_mse(a: list, b: list, expected: float) -> None:
    assert MseSensitivity().compare(T(a), T(b)) == pytest.approx(expected, rel=1e-12)


def test_kl_sensitivity_is_exp_minus_kl_of_the_softmaxes() -> None:
    float_out = torch.tensor([[math.log(1.0), math.log(3.0)], [0.0, 0.0]], dtype=torch.float64)
    quant_out = torch.zeros(2, 2, dtype=torch.float64)
    # Sample 0: p = [0.25, 0.75], q = [0.5, 0.5]; sample 1: identical (KL 0).
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    expected = math.exp(-(kl0 + 0.0) / 2)
    assert KLSensitivity().compare(float_out, quant_out) == pytest.approx(expected, rel=1e-12)
    assert KLSensitivity().compare(float_out, float_out) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", [CosineSimilarity(), MseSensitivity(), KLSensitivity()])
def test_more_noise_scores_lower(metric: SensitivityBase) -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 16, generator=g)
    noise = torch.randn(4, 16, generator=g)
    scores = [metric.compare(clean, clean + level * noise) for level in (0.0, 0.1, 0.5, 2.0)]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(1.0)
    assert all(0.0 <= score <= 1.0 + 1e-12 for score in scores)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("CosineSimilarity", CosineSimilarity), ("MSE", MseSensitivity), ("KL", KLSensitivity)],
)
def test_resolve_by_name(name: str, kind: type) -> None:
    assert type(resolve_sensitivity(name)) is kind


@pytest.mark.parametrize("bad", ["cosine", "Cos", 1, None, CosineSimilarity])
def test_resolve_rejects_unknown_names_and_wrong_types(bad: object) -> None:
    with pytest.raises(StrategyError, match="sensitivity"):
        resolve_sensitivity(bad)  # type: ignore[arg-type]


# -- score_layers ---------------------------------------------------------------------------------


class Net(nn.Module):
    """conv -> relu -> fc, and fc2 called on the result of fc (two distinct layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc(x)))


class Recorder(SensitivityBase):
    """A custom sensitivity: records what it compares and scores by the output's mean gap."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compare(self, float_out: torch.Tensor, quant_out: torch.Tensor) -> float:
        self.seen.append((float_out.clone(), quant_out.clone()))
        return 1.0 - float((float_out - quant_out).abs().mean())


def build(tmp_path: Path) -> tuple[nn.Module, QuantizedModel, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(3, 2, 5, 5) for _ in range(3)]
    config = QuantConfig.from_dict({"batch_num": 3, **{n: {"quant_enable": True} for n in ("conv", "fc", "fc2")}},
                                   model_layers=["conv", "fc", "fc2"])
    folded = fold_conv_bn(model, [])
    record = calibrate(folded, config, lambda m: [m(b) for b in batches])
    return model, build_quantized_model(folded, record), batches


def test_one_calibration_pass_scores_every_layer_on_float_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, qmodel, batches = build(tmp_path)
    calls: list[int] = []

    def run_calibration(m: nn.Module) -> None:
        calls.append(1)
        for batch in batches:
            m(batch)

    recorder = Recorder()
    qmodel.set_plan({"conv": True, "fc": False, "fc2": True})
    ranking = score_layers(qmodel, run_calibration, recorder)
    assert len(calls) == 1
    assert set(ranking.scores) == {"conv", "fc", "fc2"}
    assert len(recorder.seen) == 3 * len(batches)
    assert qmodel.plan == {"conv": True, "fc": False, "fc2": True}  # the plan is restored
    assert list(tmp_path.iterdir()) == []  # no feature maps on disk

    # The float outputs compared are the float model's own layer outputs (float inputs upstream).
    expected: list[torch.Tensor] = []
    hooks = [getattr(model, n).register_forward_hook(lambda _m, _a, out: expected.append(out.clone()))
             for n in ("conv", "fc", "fc2")]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for hook in hooks:
        hook.remove()
    assert len(expected) == len(recorder.seen)
    for want, (got_float, got_quant) in zip(expected, recorder.seen):
        assert torch.equal(want, got_float)
        assert not torch.equal(got_float, got_quant)

    # Each layer's score is the mean of its per-batch scores.
    per_layer = [recorder.seen[i::3] for i in range(3)]
    for name, seen in zip(("conv", "fc", "fc2"), per_layer):
        mean = sum(1.0 - float((f - q).abs().mean()) for f, q in seen) / len(seen)
        assert ranking.scores[name] == pytest.approx(mean, rel=1e-12)


def test_quant_output_is_the_fake_quant_layer_on_the_float_input(tmp_path: Path) -> None:
    _, qmodel, batches = build(tmp_path)
    captured: dict[str, torch.Tensor] = {}
    layer = qmodel.layer("fc2")
    layer.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0].clone()))
    recorder = Recorder()
    score_layers(qmodel, lambda m: m(batches[0]), recorder, layers=["fc2"])
    assert len(recorder.seen) == 1
    with torch.no_grad():
        want = torch.nn.functional.linear(layer.quantize_input(captured["x"]), layer.fq_weight, layer.module.bias)
    assert torch.equal(recorder.seen[0][1], want)


@pytest.mark.parametrize("metric", ["CosineSimilarity", "MSE", "KL"])
def test_builtin_ranking_is_ascending_and_in_range(tmp_path: Path, metric: str) -> None:
    _, qmodel, batches = build(tmp_path)
    ranking = score_layers(qmodel, lambda m: [m(b) for b in batches], resolve_sensitivity(metric))
    pairs = ranking.as_pairs()
    assert [score for _, score in pairs] == sorted(score for _, score in pairs)
    assert [name for name, _ in pairs] == ranking.most_sensitive_first()
    assert all(0.0 <= score <= 1.0 + 1e-9 for _, score in pairs)


def test_a_layer_that_never_runs_is_named(tmp_path: Path) -> None:
    _, qmodel, _ = build(tmp_path)
    with pytest.raises(StrategyError, match="conv"):
        score_layers(qmodel, lambda m: None, CosineSimilarity())
    # Hooks are removed even on failure: a later pass sees each layer once per batch.
    recorder = Recorder()
    score_layers(qmodel, lambda m: m(torch.randn(1, 2, 5, 5)), recorder)
    assert len(recorder.seen) == 3
