"""QuantizedModel: exact float when switched off, O(1) switching, and unusual model shapes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from amct_opt.calibration import calibrate
from amct_opt.config import QuantConfig
from amct_opt.create_config import create_quant_config
from amct_opt.errors import InputError
from amct_opt.fusion import find_conv_bn_pairs, fold_conv_bn
from amct_opt.layers import find_quantizable_layers
from amct_opt.quant_model import QuantizedModel, QuantLayer, build_quantized_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def data(n: int = 2, shape: tuple[int, ...] = (3, 1, 6, 6)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def quantize(model: nn.Module, batches: list[torch.Tensor], fuse: bool = True) -> tuple[nn.Module, QuantizedModel]:
    """(a second folded copy to compare against, the quantized model)."""
    names = list(find_quantizable_layers(model))
    cfg = QuantConfig.from_dict({"batch_num": len(batches), **{n: {"quant_enable": True} for n in names}},
                                model_layers=names)
    pairs = find_conv_bn_pairs(model) if fuse else []
    reference = fold_conv_bn(model, pairs)
    folded = fold_conv_bn(model, pairs)
    record = calibrate(folded, cfg, lambda m: [m(b) for b in batches])
    return reference, build_quantized_model(folded, record)


def trained_bn(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for x in data(4):
            model(x)
    return model.eval()


def test_every_switch_off_is_the_float_model_exactly() -> None:
    torch.manual_seed(0)
    model = trained_bn(Net())
    reference, qmodel = quantize(model, data())
    qmodel.set_all(False)
    with torch.no_grad():
        for x in data(3):
            assert torch.equal(qmodel(x), reference(x))
    # Without folding the reference is the user's model itself.
    _, unfused = quantize(model, data(), fuse=False)
    unfused.set_all(False)
    with torch.no_grad():
        assert torch.equal(unfused(data(1)[0]), model(data(1)[0]))


def test_switched_on_layers_compute_fake_quant_input_and_weight() -> None:
    torch.manual_seed(0)
    model = trained_bn(Net())
    reference, qmodel = quantize(model, data())
    qmodel.set_plan({"conv": False, "conv2": False, "fc": True})
    fc = qmodel.layer("fc")
    x = data(1)[0]
    with torch.no_grad():
        hidden = torch.relu(reference.conv2(torch.relu(reference.bn(reference.conv(x))))).flatten(1)
        want = nn.functional.linear(fc.quantize_input(hidden), fc.fq_weight, reference.fc.bias)
        assert torch.equal(qmodel(x), want)
        assert not torch.equal(qmodel(x), reference(x))
    # The fake-quant weight sits on the int8 grid of its per-output-channel scales.
    assert fc.weight_axis == 0 and len(fc.scale_w) == 5
    grid = fc.fq_weight / fc.scale_w[:, None]
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)
    assert grid.abs().max() <= 128


def test_switching_is_o1_and_copies_nothing() -> None:
    torch.manual_seed(0)
    user = trained_bn(Net())
    user_state = {k: v.clone() for k, v in user.state_dict().items()}
    _, qmodel = quantize(user, data())
    storages = {name: t.data_ptr() for name, t in [*qmodel.named_parameters(), *qmodel.named_buffers()]}
    modules = {name: id(m) for name, m in qmodel.named_modules()}
    x = data(1)[0]
    with torch.no_grad():
        outputs = {}
        for plan in ({"conv": True, "conv2": False, "fc": True}, {"conv": False}, {"fc": False}) * 3:
            qmodel.set_plan(plan)
            outputs.setdefault(tuple(sorted(qmodel.plan.items())), qmodel(x))
            assert torch.equal(outputs[tuple(sorted(qmodel.plan.items()))], qmodel(x))
    assert storages == {name: t.data_ptr() for name, t in [*qmodel.named_parameters(), *qmodel.named_buffers()]}
    assert modules == {name: id(m) for name, m in qmodel.named_modules()}
    # The user's model is never touched: same modules, same values, BN still there.
    assert isinstance(user.conv, nn.Conv2d) and isinstance(user.bn, nn.BatchNorm2d)
    assert all(torch.equal(user_state[k], v) for k, v in user.state_dict().items())
    assert all(p.data_ptr() not in storages.values() for p in user.parameters())


def test_unknown_layer_in_a_plan_is_an_input_error() -> None:
    _, qmodel = quantize(trained_bn(Net()), data())
    with pytest.raises(InputError, match="nope"):
        qmodel.set_plan({"nope": True})
    with pytest.raises(InputError, match=r"layer: unknown layer 'nope'; known layers: \['conv', 'conv2', 'fc'\]"):
        qmodel.layer("nope")


class Twice(nn.Module):
    """One Linear called twice, and registered under a second name too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.alias = self.fc
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.alias(torch.relu(self.fc(x)))))


def test_a_module_called_twice_is_quantized_at_both_calls_with_one_set_of_factors() -> None:
    torch.manual_seed(0)
    model = Twice().eval()
    assert list(find_quantizable_layers(model)) == ["fc", "head"]
    batches = data(2, (4, 6))
    reference, qmodel = quantize(model, batches)
    assert qmodel.model.alias is qmodel.model.fc
    assert isinstance(qmodel.model.fc, QuantLayer)
    fc = qmodel.layer("fc")
    qmodel.set_plan({"fc": True, "head": False})
    x = batches[0]
    with torch.no_grad():
        first = torch.relu(fc.quant_forward(x))
        want = reference.head(torch.relu(fc.quant_forward(first)))
        assert torch.equal(qmodel(x), want)
        qmodel.set_all(False)
        assert torch.equal(qmodel(x), reference(x))


class Functional(nn.Module):
    """A conv through F.conv2d with the model's own Parameter: not a module, so it stays float."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(3, 1, 3, 3))
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(nn.functional.conv2d(x, self.kernel, padding=1))
        return self.conv(x)


def test_a_functional_conv_stays_float_and_the_rest_is_quantized() -> None:
    torch.manual_seed(0)
    model = Functional().eval()
    assert list(find_quantizable_layers(model)) == ["conv"]
    reference, qmodel = quantize(model, data())
    conv = qmodel.layer("conv")
    x = data(1)[0]
    with torch.no_grad():
        float_part = torch.relu(nn.functional.conv2d(x, reference.kernel, padding=1))
        assert torch.equal(qmodel(x), conv.quant_forward(float_part))
    assert torch.equal(qmodel.model.kernel, model.kernel)


def test_deepcopy_of_a_quantized_model_keeps_its_switches() -> None:
    _, qmodel = quantize(trained_bn(Net()), data())
    qmodel.set_plan({"conv2": False})
    clone = copy.deepcopy(qmodel)
    assert clone.plan == qmodel.plan
    x = data(1)[0]
    with torch.no_grad():
        assert torch.equal(clone(x), qmodel(x))


LAYER_CASES = [
    ("conv1d", lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 8), 0, 4),
    ("conv2d", lambda: nn.Conv2d(3, 4, 3, stride=2), (2, 3, 7, 7), 0, 4),
    ("grouped2d", lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 5, 5), 0, 6),
    ("depthwise2d", lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 5, 5), 0, 4),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4), 0, 3),
    ("convT1d", lambda: nn.ConvTranspose1d(3, 5, 3, stride=2), (2, 3, 6), 1, 5),
    ("convT2d", lambda: nn.ConvTranspose2d(3, 5, 2, stride=2), (2, 3, 4, 4), 1, 5),
    ("groupedT2d", lambda: nn.ConvTranspose2d(4, 6, 2, groups=2), (2, 4, 4, 4), None, 1),
    ("linear", lambda: nn.Linear(6, 4), (3, 6), None, 1),
]


@pytest.mark.parametrize(("make", "shape", "axis", "n_scales"), [c[1:] for c in LAYER_CASES],
                         ids=[c[0] for c in LAYER_CASES])
def test_every_quantizable_type_switches_between_float_and_its_own_fake_quant(
        tmp_path: Path, make: Callable[[], nn.Module], shape: tuple[int, ...], axis: int | None, n_scales: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(make()).eval()
    x = torch.randn(shape)
    cfg = create_quant_config(tmp_path / "q.json", model, x, batch_num=2)
    assert list(cfg.layers) == ["0"]
    assert cfg.layers["0"].weight.channel_wise is not isinstance(model[0], nn.Linear)
    folded = fold_conv_bn(model, [])
    record = calibrate(folded, cfg, lambda m: [m(b) for b in (x, -x)])
    factors = record["0"]
    assert len(factors.scale_w) == n_scales
    qmodel = build_quantized_model(folded, record)
    with torch.no_grad():
        want_float = model(x)
        qmodel.set_all(False)
        assert torch.equal(qmodel(x), want_float)
        qmodel.set_all(True)
        # The reference computed apart: input and weight rounded onto their int8 grids by hand.
        w = model[0].weight
        view = [1] * w.dim()
        if axis is not None:
            view[axis] = -1
        s_w = torch.tensor(factors.scale_w).reshape(view)
        x_q = (torch.clamp(torch.round(x / factors.scale_d) + factors.offset_d, -128, 127)
               - factors.offset_d) * factors.scale_d
        reference = copy.deepcopy(model)
        reference[0].weight.copy_(torch.clamp(torch.round(w / s_w), -128, 127) * s_w)
        if isinstance(model[0], nn.modules.conv._ConvNd) and not model[0].transposed and model[0].bias is not None:
            # and the bias rounded to int32 at scale_d * scale_w, as the deploy model stores it
            s_b = torch.tensor(factors.scale_d, dtype=torch.float32) * torch.tensor(factors.scale_w)
            reference[0].bias.copy_(torch.round(model[0].bias / s_b) * s_b)
        assert torch.equal(qmodel(x), reference(x_q))
        assert not torch.equal(qmodel(x), want_float)
