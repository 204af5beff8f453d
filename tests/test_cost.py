"""Per-layer MACs and parameter counts against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amct_opt.cost import measure_layer_costs
from amct_opt.types import LayerCost


def single(layer: nn.Module, x: torch.Tensor) -> LayerCost:
    costs = measure_layer_costs(nn.Sequential(layer), (x,))
    assert list(costs) == ["0"]
    return costs["0"]


@pytest.mark.parametrize(
    ("layer", "shape", "macs", "params"),
    [
        # out (2, 8, 10): 160 outputs, each 4 in-channels x 3 taps.
        (nn.Conv1d(4, 8, 3, padding=1), (2, 4, 10), 160 * 4 * 3, 8 * 4 * 3 + 8),
        # depthwise: out (1, 8, 6, 6) = 288 outputs, each 1 in-channel x 9 taps.
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 6, 6), 288 * 1 * 9, 8 * 1 * 9 + 8),
        # grouped: out (1, 4, 3, 3) = 36 outputs, each 8/2 in-channels x 9 taps.
        (nn.Conv2d(8, 4, 3, groups=2, bias=False), (1, 8, 5, 5), 36 * 4 * 9, 4 * 4 * 9),
        # strided: out (1, 16, 4, 4) = 256 outputs, each 3 x 9.
        (nn.Conv2d(3, 16, 3, stride=2, padding=1), (1, 3, 8, 8), 256 * 3 * 9, 16 * 3 * 9 + 16),
        # out (1, 4, 3, 3, 3) = 108 outputs, each 2 in-channels x 27 taps.
        (nn.Conv3d(2, 4, 3), (1, 2, 5, 5, 5), 108 * 2 * 27, 4 * 2 * 27 + 4),
        # transposed: each of 100 input values scatters to 6 channels x 9 taps.
        (nn.ConvTranspose2d(4, 6, 3, stride=2), (1, 4, 5, 5), 100 * 6 * 9, 4 * 6 * 9 + 6),
        # grouped transposed: each of 40 input values scatters to 6/2 channels x 3 taps.
        (nn.ConvTranspose1d(4, 6, 3, groups=2), (2, 4, 5), 40 * 3 * 3, 4 * 3 * 3 + 6),
        # Linear: 3 rows x 5 outputs x 10 inputs; extra leading dims multiply.
        (nn.Linear(10, 5), (3, 10), 3 * 5 * 10, 10 * 5 + 5),
        (nn.Linear(10, 5, bias=False), (2, 7, 10), 2 * 7 * 5 * 10, 10 * 5),
    ],
    ids=["conv1d", "depthwise2d", "grouped2d", "strided2d", "conv3d", "convT2d", "groupedT1d", "linear", "linear3d"],
)
def test_macs_and_params_match_hand_computed(layer: nn.Module, shape: tuple[int, ...], macs: int, params: int) -> None:
    assert single(layer, torch.randn(shape)) == LayerCost(macs=macs, params=params)


def test_conv2d_macs_equal_im2col_patch_size_times_out_channels() -> None:
    """An independent count: im2col patches (padded taps included) times the output channels."""
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    x = torch.randn(2, 3, 7, 6)
    patches = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert single(conv, x).macs == patches.numel() * conv.out_channels


def test_a_layer_called_twice_sums_both_calls() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    costs = measure_layer_costs(Twice(), (torch.randn(4, 8),))
    assert costs == {"fc": LayerCost(macs=2 * 4 * 8 * 8, params=8 * 8 + 8)}


def test_every_quantizable_layer_is_measured_and_hooks_are_removed() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    costs = measure_layer_costs(model, (torch.randn(1, 1, 6, 6),))
    assert costs == {"0": LayerCost(32 * 1 * 9, 2 * 9 + 2), "3": LayerCost(3 * 32, 32 * 3 + 3)}
    assert all(not m._forward_hooks for m in model.modules())
