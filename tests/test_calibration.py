"""Calibration: one run of the user's loop, observers on every enabled layer, clear failures."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from amct_opt.calibration import Calibrator, calibrate, calibrate_layers, quantizer_range
from amct_opt.config import QuantConfig
from amct_opt.errors import CalibrationError
from amct_opt.observers import asymmetric_params, make_activation_observer

NAMES = ["conv", "up", "gup", "fc"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.gup = nn.ConvTranspose2d(6, 4, 1, groups=2)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = self.gup(torch.relu(self.up(x)))
        return self.fc(x.flatten(1))


def config(batch_num: int = 2, disabled: tuple[str, ...] = (), hfmg: tuple[str, ...] = ()) -> QuantConfig:
    entries: dict[str, Any] = {"batch_num": batch_num}
    for name in NAMES:
        entry: dict[str, Any] = {"quant_enable": name not in disabled}
        if name in hfmg:
            entry["activation_quant_params"] = {"act_algo": "hfmg", "num_of_bins": 1024}
        entries[name] = entry
    entries["fc"]["weight_quant_params"] = {"channel_wise": False}
    return QuantConfig.from_dict(entries, model_layers=NAMES)


def batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 2, 4, 4, generator=g) for _ in range(n)]


def counting(data: list[torch.Tensor]) -> tuple[Callable[[nn.Module], None], list[int]]:
    calls: list[int] = []

    def run(model: nn.Module) -> None:
        calls.append(1)
        for x in data:
            model(x)

    return run, calls


def test_one_run_gives_factors_for_every_enabled_layer() -> None:
    model = Net().eval()
    run, calls = counting(batches())
    record = calibrate(model, config(disabled=("gup",), hfmg=("up",)), run)
    assert calls == [1]
    assert list(record) == ["conv", "up", "fc"]
    # Weight scales: per output channel (axis 0 for conv, axis 1 for transposed), one for Linear.
    assert len(record["conv"].scale_w) == 4
    assert len(record["up"].scale_w) == 6
    assert len(record["fc"].scale_w) == 1
    for factors in record.values():
        assert factors.scale_d > 0 and -128 <= factors.offset_d <= 127
        assert all(s > 0 for s in factors.scale_w) and set(factors.offset_w) == {0}
    # ARQ: symmetric max-abs per channel.
    expected = model.conv.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
    torch.testing.assert_close(torch.tensor(record["conv"].scale_w), expected, rtol=1e-6, atol=0)
    # No hook is left behind.
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_grouped_transposed_conv_uses_one_weight_scale() -> None:
    record = calibrate(Net().eval(), config(), counting(batches())[0])
    assert len(record["gup"].scale_w) == 1


def test_activation_scale_covers_the_observed_range() -> None:
    model = Net().eval()
    data = batches()
    record = calibrate(model, config(), counting(data)[0])
    lo = min(float(x.min()) for x in data)
    hi = max(float(x.max()) for x in data)
    width = (max(hi, 0.0) - min(lo, 0.0)) / 255
    # IFMR clips each end within search_range [0.7, 1.3] of the percentile value.
    assert 0.6 * width <= record["conv"].scale_d <= 1.31 * width


def test_calibration_is_deterministic() -> None:
    model = Net().eval()
    first = calibrate(model, config(hfmg=("fc",)), counting(batches())[0])
    second = calibrate(model, config(hfmg=("fc",)), counting(batches())[0])
    assert first == second


def test_too_few_batches_name_batch_num() -> None:
    model = Net().eval()
    with pytest.raises(CalibrationError, match=r"ran 2 batch\(es\).*batch_num is 3"):
        calibrate(model, config(batch_num=3), counting(batches(2))[0])
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_layer_the_batches_never_reach_is_named() -> None:
    class Branchy(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv(x))
            return self.fc(torch.nn.functional.interpolate(x, scale_factor=2).flatten(1))

    with pytest.raises(CalibrationError, match="'up' never ran"):
        calibrate(Branchy().eval(), config(), counting(batches())[0])


def test_hooks_are_removed_when_the_users_loop_raises() -> None:
    model = Net().eval()

    def broken(m: nn.Module) -> None:
        m(batches(1)[0])
        raise RuntimeError("user loop failed")

    with pytest.raises(RuntimeError, match="user loop failed"):
        calibrate(model, config(), broken)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_layer_called_twice_is_observed_at_both_calls() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(10.0 * self.fc(x))

    model = Twice().eval()
    cfg = QuantConfig.from_dict({"batch_num": 1, "fc": {"quant_enable": True}}, model_layers=["fc"])
    calibrator = Calibrator(model, cfg)
    calibrator.attach()
    with torch.no_grad():
        first = model.fc(torch.ones(1, 4))
        model(torch.ones(1, 4))
    calibrator.detach()
    assert calibrator.observers["fc"].batches == 3
    assert calibrator.batches == 1
    # The observed range holds the second call's (10x larger) input.
    assert calibrator.observers["fc"].data_max >= float((10.0 * first).max())


def test_the_same_pass_calibrates_each_layers_output_range_including_zero() -> None:
    """A Conv's output range is its activation algorithm's on the output; other layers' is the min/max."""
    torch.manual_seed(0)
    model = Net().eval()
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in NAMES}
    for name in NAMES:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, name=name: seen[name].append(out.detach())
        )
    run, calls = counting(batches())
    cfg = config(disabled=("gup",))
    calibration = calibrate_layers(model, cfg, run)
    assert calls == [1]
    assert set(calibration.output_ranges) == set(calibration.record) == {"conv", "up", "fc"}
    for name in ("up", "fc"):  # not requantized by the deploy model: the range seen
        outputs = torch.cat([t.flatten() for t in seen[name]])
        assert calibration.output_ranges[name].lo == pytest.approx(min(0.0, float(outputs.min())))
        assert calibration.output_ranges[name].hi == pytest.approx(max(0.0, float(outputs.max())))
    observer = make_activation_observer(cfg.layers["conv"].activation)
    for out in seen["conv"]:
        observer.update(out)
    scale, offset = observer.compute()
    conv_range = calibration.output_ranges["conv"]
    assert conv_range == quantizer_range(scale, offset)
    assert conv_range.lo <= 0.0 <= conv_range.hi
    assert asymmetric_params(conv_range.lo, conv_range.hi) == (scale, offset)  # the deploy's requantizer
    outputs = torch.cat([t.flatten() for t in seen["conv"]])
    lo, hi = float(outputs.min()), float(outputs.max())
    assert lo - scale <= conv_range.lo and conv_range.hi <= hi + scale  # within the data, to a step
    assert (conv_range.lo, conv_range.hi) != pytest.approx((min(lo, 0.0), max(hi, 0.0)))  # not the min/max



def test_calibrating_with_autograd_on_warns_nothing() -> None:
    # torch warns once per process, so the check runs in a fresh one.
    script = (
        "import torch, sys; sys.path.insert(0, 'tests'); from test_calibration import *\n"
        "model = Net().eval(); c = Calibrator(model, config(batch_num=1)); c.attach()\n"
        "model(batches(1)[0]); c.detach(); assert set(c.finalize()) == set(NAMES)\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=120)
    assert done.returncode == 0, done.stderr
