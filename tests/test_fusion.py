"""Conv+BN folding: equal outputs, and pairs read from the dataflow rather than module order."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from amct_opt.config import QuantConfig
from amct_opt.errors import InputError
from amct_opt.fusion import FusionPair, find_conv_bn_pairs, fold_conv_bn, fusion_info, pairs_to_fold


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                if module.track_running_stats:
                    module.running_mean.copy_(torch.randn(n, generator=g))
                    module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.randn(n, generator=g))
                    module.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def same_outputs(model: nn.Module, x: torch.Tensor) -> nn.Module:
    pairs = find_conv_bn_pairs(model)
    folded = fold_conv_bn(model, pairs)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    return folded


@pytest.mark.parametrize(
    ("conv", "bn", "shape"),
    [
        (nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), (2, 3, 9)),
        (nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), (2, 3, 7, 7)),
        (nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6, affine=False), (2, 6, 7, 7)),
        (nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), (1, 2, 5, 5, 5)),
    ],
    ids=["conv1d", "conv2d-nobias", "depthwise-noaffine", "conv3d"],
)
def test_folding_keeps_outputs(conv: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> None:
    model = randomize_bn(nn.Sequential(conv, bn, nn.ReLU()))
    assert find_conv_bn_pairs(model) == [FusionPair("0", "1")]
    folded = same_outputs(model, torch.randn(shape))
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].bias is not None


class Shuffled(nn.Module):
    """BNs declared in a different order than they are used, with convs in between."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_b = nn.BatchNorm2d(8)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.conv_a(x)))
        return self.bn_b(self.conv_b(x))


def test_pairs_come_from_the_dataflow_not_the_declaration_order() -> None:
    model = randomize_bn(Shuffled())
    assert sorted(find_conv_bn_pairs(model), key=lambda p: p.conv) == [
        FusionPair("conv_a", "bn_a"),
        FusionPair("conv_b", "bn_b"),
    ]
    same_outputs(model, torch.randn(2, 3, 6, 6))


class Residual(nn.Module):
    """conv's output feeds the BN and also a residual add: folding would change the add's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y
        return self.bn2(self.conv2(z))


def test_a_conv_whose_output_also_feeds_a_residual_is_not_folded() -> None:
    model = randomize_bn(Residual())
    assert find_conv_bn_pairs(model) == [FusionPair("conv2", "bn2")]
    folded = same_outputs(model, torch.randn(2, 4, 5, 5))
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert isinstance(folded.bn2, nn.Identity)


class Unfoldable(nn.Module):
    """Conv→BN pairs that must stay apart (a conv called twice, a BN called twice, a BN without
    running statistics, a transposed conv), and one proper Conv1d→BatchNorm1d pair after a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Conv2d(4, 4, 1)
        self.bn_twice = nn.BatchNorm2d(4)
        self.conv_shared_bn = nn.Conv2d(4, 4, 1)
        self.shared_bn = nn.BatchNorm2d(4)
        self.conv_nostats = nn.Conv2d(4, 4, 1)
        self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)
        self.up = nn.ConvTranspose2d(4, 4, 1)
        self.bn_up = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 4, 1)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_twice(self.twice(self.twice(x)))
        x = self.shared_bn(self.conv_shared_bn(x)) + self.shared_bn(x)
        x = self.bn_nostats(self.conv_nostats(x))
        x = self.bn_up(self.up(x))
        n, c, h, w = x.shape
        y = self.bn1d(self.conv1d(x.reshape(n, c, h * w)))
        return y.reshape(n, c, h, w)


def test_unsafe_pairs_are_left_alone() -> None:
    model = randomize_bn(Unfoldable())
    pairs = find_conv_bn_pairs(model)
    assert FusionPair("conv1d", "bn1d") in pairs  # a proper Conv1d→BatchNorm1d pair
    assert [p for p in pairs if p.conv != "conv1d"] == []
    same_outputs(model, torch.randn(2, 4, 3, 3))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


def test_an_untraceable_model_is_not_folded_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="amct_opt"):
        assert find_conv_bn_pairs(Untraceable()) == []
    assert "cannot be traced" in caplog.text


def test_a_model_without_batchnorm_is_not_traced() -> None:
    class NoBn(Untraceable):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.Identity()

    assert find_conv_bn_pairs(NoBn()) == []


def test_folding_never_touches_the_users_model() -> None:
    model = randomize_bn(Shuffled())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_conv_bn(model, find_conv_bn_pairs(model))
    assert model.training and not folded.training
    assert isinstance(model.bn_a, nn.BatchNorm2d) and isinstance(folded.bn_a, nn.Identity)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert folded.conv_a.weight.data_ptr() != model.conv_a.weight.data_ptr()


def test_pairs_to_fold_honours_do_fusion_and_skip_fusion_layers() -> None:
    model = randomize_bn(Shuffled())
    names = ["conv_b", "conv_a"]

    def config(**top: object) -> QuantConfig:
        return QuantConfig.from_dict({**top, **{n: {"quant_enable": True} for n in names}}, model_layers=names)

    both = [FusionPair("conv_a", "bn_a"), FusionPair("conv_b", "bn_b")]
    assert sorted(pairs_to_fold(model, config()), key=lambda p: p.conv) == both
    assert pairs_to_fold(model, config(do_fusion=False)) == []
    assert pairs_to_fold(model, config(skip_fusion_layers=["conv_a"])) == [FusionPair("conv_b", "bn_b")]


def test_fusion_info_says_what_was_folded_into_what() -> None:
    info = fusion_info([FusionPair("conv_a", "bn_a")], {"conv_a": True, "fc": False}, "0.1.0")
    assert info == {"version": "0.1.0", "fusions": [{"layer": "conv_a", "fused": ["conv_a", "bn_a"]}],
                    "quantized_layers": ["conv_a"], "float_layers": ["fc"]}


@pytest.mark.parametrize(("pair", "fragment"), [
    (FusionPair("conv_a", "nope"), r"pairs\[0\]: .*names no module"),
    (FusionPair("bn_a", "conv_a"), r"pairs\[0\]: expected Conv1d/2d/3d 'bn_a'"),
    (FusionPair("conv_a", "bn_b"), r"got Conv2d and BatchNorm2d"),
])
def test_fold_conv_bn_rejects_pairs_that_cannot_be_folded(pair: FusionPair, fragment: str) -> None:
    model = randomize_bn(Shuffled())
    if pair.bn == "bn_b":  # a BatchNorm without running statistics
        model.bn_b = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(InputError, match=fragment):
        fold_conv_bn(model, [pair])
