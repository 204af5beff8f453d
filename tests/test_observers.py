"""IFMR, HFMG and ARQ against hand-computed values and brute-force searches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amct_opt.config import ActivationQuantParams
from amct_opt.errors import CalibrationError, ConfigError, InputError
from amct_opt.fake_quant import QMAX, QMIN, fake_quant, fake_quant_per_channel
from amct_opt.observers import (
    MIN_SCALE,
    ZERO_RANGE_SCALE,
    ActivationObserver,
    HFMGObserver,
    IFMRObserver,
    _expected_sq_error,
    _quantile,
    _search_steps,
    arq_quantize,
    asymmetric_params,
    make_activation_observer,
    symmetric_params,
)

EXACT = dict(max_percentile=1.0, min_percentile=1.0, search_range=(1.0, 1.0))


def f32(value: float) -> float:
    return float(np.float32(value))


def mse(x: torch.Tensor, qparams: tuple[float, int]) -> float:
    scale, offset = qparams
    return float(((x - fake_quant(x, torch.tensor(scale), torch.tensor(float(offset)))) ** 2).mean())


def ifmr(x: torch.Tensor, **params: object) -> tuple[float, int]:
    observer = IFMRObserver(ActivationQuantParams(**params))  # type: ignore[arg-type]
    observer.update(x)
    return observer.compute()


def hfmg(*batches: torch.Tensor, **params: object) -> HFMGObserver:
    observer = HFMGObserver(ActivationQuantParams(act_algo="hfmg", **params))  # type: ignore[arg-type]
    for batch in batches:
        observer.update(batch)
    return observer


# --- shared parameter helpers ---------------------------------------------------------------


def test_asymmetric_params_by_hand() -> None:
    # scale 3/255; -1/scale = -85 -> offset = 85 - 128
    assert asymmetric_params(-1.0, 2.0) == (f32(3 / 255), -43)
    assert asymmetric_params(0.5, 2.0) == (f32(2 / 255), -128)  # widened to hold 0
    assert asymmetric_params(-2.0, -1.0) == (f32(2 / 255), 127)
    assert asymmetric_params(0.0, 0.0) == (ZERO_RANGE_SCALE, -128)


def test_symmetric_params_by_hand() -> None:
    assert symmetric_params(1.27) == (f32(0.01), 0)
    assert symmetric_params(0.0) == (ZERO_RANGE_SCALE, 0)
    assert symmetric_params(1e-30) == (MIN_SCALE, 0)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(InputError):
            symmetric_params(bad)
    with pytest.raises(InputError):
        asymmetric_params(-math.inf, 1.0)


# --- IFMR -----------------------------------------------------------------------------------


def test_ifmr_without_search_is_the_data_range() -> None:
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    assert ifmr(x, **EXACT) == (f32(3 / 255), -43)
    assert ifmr(x, asymmetric=False, **EXACT) == (f32(2 / 127), 0)


def test_ifmr_percentile_start_matches_numpy() -> None:
    x = torch.arange(-200, 801, dtype=torch.float32)
    params = dict(max_percentile=0.99, min_percentile=0.99, search_range=(1.0, 1.0))
    hi, lo = np.quantile(x.numpy(), 0.99), np.quantile(x.numpy(), 0.01)
    assert (hi, lo) == (790.0, -190.0)
    assert ifmr(x, **params) == asymmetric_params(-190.0, 790.0)
    assert ifmr(x, asymmetric=False, **params) == symmetric_params(790.0)


@pytest.mark.parametrize("n, q", [(1001, 0.999), (1001, 0.001), (20000, 0.6), (20000, 0.999999), (7, 0.5)])
def test_quantile_matches_numpy(n: int, q: float) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert _quantile(x, q) == pytest.approx(float(np.quantile(x.double().numpy(), q)), rel=1e-6, abs=1e-6)


def test_search_steps() -> None:
    steps = _search_steps(ActivationQuantParams())
    assert len(steps) == 61 and steps[0] == 0.7 and steps[-1] == pytest.approx(1.3)
    with pytest.raises(ConfigError, match="search_range"):
        _search_steps(ActivationQuantParams(search_step=0.0))


@pytest.mark.parametrize(("n", "expected"), [(20_000, f32(0.635 / 127)), (10_000, f32(1.27 / 127))])
def test_ifmr_search_by_hand(n: int, expected: float) -> None:
    # One outlier 1.27 and n values 0.005; candidate bounds 1.27 * {0.5, 1.0}:
    #   bound 0.635 (scale 0.005): 0.005 is exact, the outlier clips to 0.635: error 0.635**2 = 0.403;
    #   bound 1.27 (scale 0.01): the outlier is exact, each 0.005 is off by half a step: n * 0.005**2.
    # So the smaller bound wins for n = 20000 (0.5 > 0.403) and loses for n = 10000 (0.25 < 0.403).
    x = torch.cat([torch.tensor([1.27]), torch.full((n,), 0.005)])
    params = dict(max_percentile=1.0, min_percentile=1.0, search_range=(0.5, 1.0), search_step=0.5)
    assert ifmr(x, asymmetric=False, **params) == (expected, 0)


def test_ifmr_symmetric_finds_the_exact_grid_optimum() -> None:
    x = torch.distributions.Laplace(0.0, 1.0).sample((50_000,))
    params = ActivationQuantParams(asymmetric=False)
    bound0 = max(-_quantile(x, 1 - params.min_percentile), _quantile(x, params.max_percentile))
    top = float(x.abs().max())
    brute = min(mse(x, symmetric_params(min(bound0 * s, top))) for s in _search_steps(params))
    assert mse(x, ifmr(x, asymmetric=False)) <= brute * (1 + 1e-4)


def _skewed() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    bulk = torch.randn(40_000, generator=gen).abs()  # in [0, ~4.3]
    tail = -6.0 - 2.0 * torch.rand(8, generator=gen)  # a few negative outliers down to -8
    return torch.cat([bulk, tail])


def test_ifmr_searching_both_ends_beats_max_only() -> None:
    x = _skewed()
    params = ActivationQuantParams()
    lo0 = min(_quantile(x, 1 - params.min_percentile), 0.0)
    hi0 = _quantile(x, params.max_percentile)
    dmax = float(x.max())
    max_only = min(mse(x, asymmetric_params(lo0, min(hi0 * s, dmax))) for s in _search_steps(params))
    both = mse(x, ifmr(x))
    assert both < 0.97 * max_only  # about 5% lower here


def test_ifmr_asymmetric_is_near_the_2d_grid_optimum() -> None:
    x = _skewed()[::16].contiguous()
    params = ActivationQuantParams()
    steps = torch.tensor(_search_steps(params))
    lo0, hi0 = min(_quantile(x, 1 - params.min_percentile), 0.0), _quantile(x, params.max_percentile)
    his = (hi0 * steps).clamp(max=float(x.max())).tolist()
    los = (lo0 * steps).clamp(min=float(x.min())).tolist()
    grid = [asymmetric_params(lo, hi) for lo in los for hi in his]
    scale = torch.tensor([s for s, _ in grid]).unsqueeze(1)
    offset = torch.tensor([float(o) for _, o in grid]).unsqueeze(1)
    best = float(((x - fake_quant(x, scale, offset)) ** 2).mean(dim=1).min())
    assert mse(x, ifmr(x)) <= best * 1.002


def test_ifmr_never_clips_beyond_the_data() -> None:
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(1)) * 3.0  # ReLU-like, in [0, 3)
    scale, offset = ifmr(x, max_percentile=1.0, search_range=(1.0, 1.3))
    assert offset == QMIN  # the range starts at 0, so a following Relu is a no-op
    assert (QMAX - offset) * scale <= float(x.max()) * (1 + 1e-6)


def test_ifmr_memory_cap_and_exact_range() -> None:
    observer = IFMRObserver(ActivationQuantParams(), max_samples=1000)
    gen = torch.Generator().manual_seed(2)
    for i in range(20):
        batch = torch.randn(333, generator=gen)
        batch[1] = 50.0 + i  # odd positions are dropped once the stride grows
        observer.update(batch)
    observer.update(torch.randn(5000, generator=gen))
    assert observer.batches == 21
    assert 0 < observer.stored_samples <= 1000
    assert observer.data_max == 69.0
    scale, offset = observer.compute()
    assert math.isfinite(scale) and scale > 0 and QMIN <= offset <= QMAX


@pytest.mark.parametrize(
    "asymmetric, expected", [(True, (ZERO_RANGE_SCALE, QMIN)), (False, (ZERO_RANGE_SCALE, 0))]
)
def test_all_zero_input(asymmetric: bool, expected: tuple[float, int]) -> None:
    zeros = torch.zeros(3, 4)
    assert ifmr(zeros, asymmetric=asymmetric) == expected
    assert hfmg(zeros, zeros, asymmetric=asymmetric).compute() == expected


def test_constant_input() -> None:
    assert ifmr(torch.full((10,), 5.0)) == (f32(5 / 255), QMIN)
    assert hfmg(torch.full((10,), -3.0), asymmetric=False).compute() == (f32(3 / 127), 0)


@pytest.mark.parametrize("algo", ["ifmr", "hfmg"])
def test_observer_errors(algo: str) -> None:
    observer = make_activation_observer(ActivationQuantParams(act_algo=algo))
    assert isinstance(observer, ActivationObserver)
    observer.update(torch.empty(0))
    assert observer.batches == 1
    with pytest.raises(CalibrationError, match="no activation data"):
        observer.compute()
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        observer.update(torch.tensor([1.0, math.nan]))
    with pytest.raises(InputError):
        observer.update([1.0])  # type: ignore[arg-type]


def test_make_activation_observer() -> None:
    assert isinstance(make_activation_observer(ActivationQuantParams()), IFMRObserver)
    assert isinstance(make_activation_observer(ActivationQuantParams(act_algo="hfmg")), HFMGObserver)
    with pytest.raises(ConfigError, match="act_algo"):
        make_activation_observer(ActivationQuantParams(act_algo="kl"))
    with pytest.raises(ConfigError, match="max_percentile"):
        make_activation_observer(ActivationQuantParams(max_percentile=0.3))
    with pytest.raises(ConfigError, match="num_bits"):
        make_activation_observer(ActivationQuantParams(num_bits=4))


# --- HFMG -----------------------------------------------------------------------------------


def test_expected_error_matches_dense_integration() -> None:
    edges = torch.tensor([-3.0, -1.3, -0.2, 0.05, 0.6, 1.9, 2.4], dtype=torch.float64)
    counts = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 11.0], dtype=torch.float64)
    qparams = [asymmetric_params(-1.0, 2.0), symmetric_params(1.5), asymmetric_params(-2.5, 0.4)]
    got = _expected_sq_error(edges, counts, qparams)
    for k, (scale, offset) in enumerate(qparams):
        total = 0.0
        for i in range(6):
            t = torch.linspace(float(edges[i]), float(edges[i + 1]), 200_001, dtype=torch.float64)
            err = (
                t - fake_quant(t, torch.tensor(scale, dtype=torch.float64), torch.tensor(float(offset)))
            ) ** 2
            total += float(counts[i]) * float(torch.trapezoid(err, t)) / float(edges[i + 1] - edges[i])
        assert float(got[k]) == pytest.approx(total, rel=1e-4)


def test_expected_error_of_whole_periods_is_scale_squared_over_12() -> None:
    scale, offset = asymmetric_params(0.0, 2.55)  # grid 0, s, ..., 255 s
    edges = torch.tensor([0.0, 10 * scale], dtype=torch.float64)
    got = _expected_sq_error(edges, torch.ones(1, dtype=torch.float64), [(scale, offset)])
    assert float(got[0]) == pytest.approx(scale**2 / 12, rel=1e-9)


def _bin(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    counts, _ = np.histogram(x.double().numpy(), bins=edges.numpy())
    return torch.from_numpy(counts)


def test_hfmg_merge_equals_one_batch_of_the_concatenation() -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [
        torch.rand(5000, generator=gen) * 2,  # [0, 2]
        torch.randn(5000, generator=gen) * 3,  # about [-11, 11]: widens both ends
        torch.rand(50, generator=gen) * 40,  # [0, 40]: widens the top again
    ]
    observer = hfmg(*batches, num_of_bins=1024)
    counts, edges = observer.histogram()
    both = torch.cat(batches)
    assert int(counts.sum()) == both.numel()
    assert int((counts - _bin(both, edges)).abs().sum()) <= 2  # at most a value sitting on an edge
    span = observer.data_max - min(observer.data_min, 0.0)
    assert float(edges[-1] - edges[0]) <= 2 * span * (1 + 1e-9)  # the data fills at least half the bins
    one = hfmg(both, num_of_bins=1024)
    assert mse(both, observer.compute()) == pytest.approx(mse(both, one.compute()), rel=0.02)


def test_hfmg_counts_zeros_seen_before_any_range() -> None:
    observer = hfmg(torch.zeros(7), torch.tensor([-1.0, 1.0]), num_of_bins=16)
    counts, edges = observer.histogram()
    assert int(counts.sum()) == 9
    assert (
        int(counts[int(torch.searchsorted(edges, torch.tensor(0.0, dtype=torch.float64), right=True)) - 1])
        == 7
    )


@pytest.mark.parametrize("asymmetric", [True, False])
def test_hfmg_finds_the_exhaustive_edge_optimum(asymmetric: bool) -> None:
    x = _skewed()
    observer = hfmg(x, num_of_bins=64, asymmetric=asymmetric)
    counts, edges = observer.histogram()
    dmin, dmax = observer.data_min, observer.data_max
    inner = edges[1:-1]
    if asymmetric:
        his = inner[(inner > 0) & (inner < dmax)].tolist() + [dmax]
        los = inner[(inner < 0) & (inner > dmin)].tolist() + [dmin]
        grid = [asymmetric_params(lo, hi) for lo in los for hi in his]
    else:
        bounds = inner.abs()
        grid = [symmetric_params(b) for b in bounds[bounds < max(-dmin, dmax)].tolist() + [max(-dmin, dmax)]]
    errs = _expected_sq_error(edges.clamp(dmin, dmax), counts.double(), grid)
    got = _expected_sq_error(edges.clamp(dmin, dmax), counts.double(), [observer.compute()])
    assert float(got[0]) <= float(errs.min()) * (1 + 1e-9)


def test_hfmg_coarse_to_fine_matches_a_full_scan() -> None:
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    observer = hfmg(x, num_of_bins=2048, asymmetric=False)
    counts, edges = observer.histogram()
    top = max(-observer.data_min, observer.data_max)
    bounds = edges[1:-1].abs()
    grid = [symmetric_params(b) for b in sorted(set(bounds[(bounds > 0) & (bounds < top)].tolist()))]
    clipped = edges.clamp(observer.data_min, observer.data_max)
    chunks = (grid[i : i + 256] for i in range(0, len(grid), 256))
    full = min(float(_expected_sq_error(clipped, counts.double(), chunk).min()) for chunk in chunks)
    got = float(_expected_sq_error(clipped, counts.double(), [observer.compute()])[0])
    assert len(grid) > 500 and got <= full * (1 + 1e-9)


def test_hfmg_is_close_to_ifmr() -> None:
    x = _skewed()
    assert mse(x, hfmg(x).compute()) <= 1.05 * mse(x, ifmr(x))


# --- ARQ ------------------------------------------------------------------------------------


def test_arq_per_channel_by_hand() -> None:
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]])
    assert arq_quantize(w, channel_wise=True) == ((f32(2 / 127), f32(0.5 / 127), ZERO_RANGE_SCALE), (0, 0, 0))
    assert arq_quantize(w, channel_wise=False) == ((f32(2 / 127),), (0,))
    assert arq_quantize(w, channel_wise=True, axis=-1) == ((f32(1 / 127), f32(2 / 127)), (0, 0))


def test_arq_transposed_axis_and_error_bound() -> None:
    w = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(4))  # ConvTranspose: out on axis 1
    scales, offsets = arq_quantize(w, channel_wise=True, axis=1)
    assert len(scales) == 6 and offsets == (0,) * 6
    assert scales == tuple(f32(float(m) / 127) for m in w.abs().amax(dim=(0, 2, 3)))
    scale_t = torch.tensor(scales)
    qdq = fake_quant_per_channel(w, scale_t, torch.zeros(6), axis=1)
    assert bool(((w - qdq).abs() <= scale_t.reshape(1, -1, 1, 1) / 2 + 1e-7).all())


def test_arq_errors() -> None:
    with pytest.raises(InputError, match="axis"):
        arq_quantize(torch.ones(2, 2), channel_wise=True, axis=2)
    with pytest.raises(InputError, match="NaN"):
        arq_quantize(torch.tensor([[math.nan]]), channel_wise=True)
    with pytest.raises(InputError, match="non-empty"):
        arq_quantize(torch.empty(0, 3), channel_wise=False)


def test_arq_seven_bit_weights_put_the_largest_magnitude_at_63() -> None:
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    assert arq_quantize(w, channel_wise=True, num_bits=7) == ((f32(2 / 63), f32(0.5 / 63)), (0, 0))
    scales = torch.tensor(arq_quantize(w, channel_wise=True, num_bits=7)[0]).reshape(-1, 1)
    assert int((w / scales).round().abs().max()) == 63
    with pytest.raises(InputError, match="num_bits"):
        arq_quantize(w, channel_wise=True, num_bits=6)
