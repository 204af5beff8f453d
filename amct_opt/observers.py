"""Calibration observers: IFMR and HFMG for activations, ARQ for weights.

Factors follow :mod:`amct_opt.fake_quant` (int8, ``q = clamp(round_half_even(x / scale) + offset)``)
and every range holds 0.  :func:`symmetric_params` / :func:`asymmetric_params`, used by all of them:

* round scales to float32, as ONNX stores them, so record, fake-quant and export agree bit for bit;
* give an all-zero range scale 1.0 (ONNX Runtime's choice): 0 stays exact and the next layer's int32
  bias ``b / (scale_w * scale_d)`` stays in range, which a tiny scale would break;
* floor any other scale at :data:`MIN_SCALE` (2**-32), a normal float32 with a finite reciprocal.

IFMR keeps a bounded deterministic subsample (every ``stride``-th element; the stride doubles when
the cap would be passed) and the exact global min/max.  ``compute()`` starts from the percentiles
and searches the clip ends ``start * s`` for ``s`` in ``search_range`` by ``search_step``, never
beyond the observed [min, max]: the bound when symmetric; max and min in turn (coordinate descent)
when asymmetric, which beats the reference's max-only search on skewed data.  A candidate's MSE is
read off a 16384-bin histogram of the searched region (plus one bin per tail) that keeps each bin's
count and mean: exact except in bins straddling a rounding boundary, and O(bins) per candidate.

HFMG keeps ``num_of_bins`` counts.  A batch beyond the range widens it by an integer factor with
edges on old edges, so old bins merge whole (no smearing) and the data fills at least half the
bins.  ``compute()`` scores a clip range by each bin's expected squared error, its count uniform
over the bin, integrated in closed form, and searches both ends (or the bound) over the bin edges,
coarse-to-fine.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from .config import ActivationQuantParams
from .errors import CalibrationError, ConfigError, InputError
from .fake_quant import QMAX, QMIN, fake_quant

__all__ = [
    "MIN_SCALE",
    "ZERO_RANGE_SCALE",
    "ActivationObserver",
    "IFMRObserver",
    "HFMGObserver",
    "make_activation_observer",
    "arq_quantize",
    "symmetric_params",
    "asymmetric_params",
]

MIN_SCALE = 2.0**-32
ZERO_RANGE_SCALE = 1.0
_IFMR_BINS = 1 << 14
_COARSE = 32  # candidates scored per coarse stage of a search over bin edges
_MAX_ROUNDS = 3  # rounds (a max turn and a min turn each) of the coordinate search
_TOPK_LIMIT = 1 << 12  # order statistics this close to an end use topk, not kthvalue

QParams = tuple[float, int]


def _finish_scale(raw: float) -> float:
    if raw == 0.0:
        return ZERO_RANGE_SCALE
    return max(float(struct.unpack("f", struct.pack("f", raw))[0]), MIN_SCALE)


def symmetric_params(bound: float) -> QParams:
    """``(bound / 127, 0)`` for a clip range [-bound, bound], ``bound >= 0``."""
    bound = float(bound)
    if not (math.isfinite(bound) and bound >= 0.0):
        raise InputError(f"bound must be a finite number >= 0, got {bound}")
    return _finish_scale(bound / QMAX), 0


def asymmetric_params(lo: float, hi: float) -> QParams:
    """``(scale, offset)`` for the clip range [lo, hi], first widened to hold 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"clip range must be finite, got [{lo}, {hi}]")
    scale = _finish_scale((hi - lo) / (QMAX - QMIN))
    offset = QMIN - round(lo / scale)
    return scale, min(max(offset, QMIN), QMAX)


@runtime_checkable
class ActivationObserver(Protocol):
    """Collects a layer's input activations and turns them into (scale, offset)."""

    batches: int

    def update(self, x: torch.Tensor) -> None: ...

    def compute(self) -> QParams: ...


class _RangeObserver:
    """Counts batches and elements and tracks the exact global min/max."""

    def __init__(self, params: ActivationQuantParams) -> None:
        if params.num_bits != 8:
            raise ConfigError(f"activation_quant_params.num_bits must be 8, got {params.num_bits}")
        self.params = params
        self.batches = 0
        self.numel = 0
        self.data_min = math.inf
        self.data_max = -math.inf

    def _observe(self, x: torch.Tensor) -> tuple[torch.Tensor, float, float] | None:
        """Count the batch; return it flat float32 on CPU with its min/max, or None if empty."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"update() expects a torch.Tensor, got {type(x).__name__}")
        self.batches += 1
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return None
        flat = flat.to(device="cpu", dtype=torch.float32)
        lo_t, hi_t = torch.aminmax(flat)
        lo, hi = float(lo_t), float(hi_t)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CalibrationError(f"{type(self).__name__}: activation batch {self.batches} holds NaN or Inf")
        self.numel += flat.numel()
        self.data_min, self.data_max = min(self.data_min, lo), max(self.data_max, hi)
        return flat, lo, hi

    def _check_seen(self) -> None:
        if self.numel == 0:
            raise CalibrationError(
                f"{type(self).__name__}: no activation data seen ({self.batches} batches); "
                "run calibration batches through the model first"
            )

    def _params(self, lo: float, hi: float) -> QParams:
        if self.params.asymmetric:
            return asymmetric_params(lo, hi)
        return symmetric_params(max(-lo, hi))


def _best(
    cands: Sequence[float],
    current: float,
    to_params: Callable[[float], QParams],
    cost: Callable[[list[QParams]], torch.Tensor],
) -> float:
    """The candidate (or ``current``) whose ``to_params`` costs least; ``cands`` sorted ascending.

    While more than ``2 * _COARSE`` candidates are left, an evenly spaced subset
    of them is scored and only those between the best one's neighbours are kept.
    """

    def costs(stage: Sequence[float]) -> torch.Tensor:
        return cost([to_params(c) for c in stage])

    while len(cands) > 2 * _COARSE:
        last = len(cands) - 1
        grid = sorted({round(i * last / (_COARSE - 1)) for i in range(_COARSE)})
        b = int(torch.argmin(costs([cands[g] for g in grid])))
        cands = cands[grid[max(b - 1, 0)] : grid[min(b + 1, len(grid) - 1)] + 1]
    stage = [current, *cands]
    return stage[int(torch.argmin(costs(stage)))]


def _clip_search(
    asymmetric: bool,
    lo0: float,
    hi0: float,
    lo_cands: Sequence[float],
    hi_cands: Sequence[float],
    cost: Callable[[list[QParams]], torch.Tensor],
) -> QParams:
    """Search the clip range from [lo0, hi0]: the bound if symmetric, else max and min in turn.

    Symmetric candidates are ``hi_cands`` (bounds); ``lo_cands`` is used only when asymmetric.
    """
    if not asymmetric:
        return symmetric_params(_best(hi_cands, hi0, symmetric_params, cost))
    lo, hi = lo0, hi0
    for turn in range(2 * _MAX_ROUNDS):  # max, min, max, ...; done when a turn changes nothing
        if turn % 2 == 0:
            new = _best(hi_cands, hi, functools.partial(asymmetric_params, lo), cost)
            changed, hi = new != hi, new
        else:
            new = _best(lo_cands, lo, functools.partial(asymmetric_params, hi=hi), cost)
            changed, lo = new != lo, new
        if turn and not changed:
            break
    return asymmetric_params(lo, hi)


def _quantile(data: torch.Tensor, q: float) -> float:
    """``numpy.quantile(data, q)`` (linear interpolation) without a full sort."""
    n = data.numel()
    pos = q * (n - 1)
    i = min(int(math.floor(pos)), n - 1)
    j = min(i + 1, n - 1)
    if n - i <= _TOPK_LIMIT:
        top = torch.topk(data, n - i).values  # descending: sorted[k] == top[n - 1 - k]
        a, b = float(top[n - 1 - i]), float(top[n - 1 - j])
    elif j < _TOPK_LIMIT:
        bottom = torch.topk(data, j + 1, largest=False).values
        a, b = float(bottom[i]), float(bottom[j])
    else:
        a, b = float(torch.kthvalue(data, i + 1).values), float(torch.kthvalue(data, j + 1).values)
    return a + (pos - i) * (b - a)


def _search_steps(params: ActivationQuantParams) -> list[float]:
    start, stop = params.search_range
    step = params.search_step
    if not (0 < start <= stop and step > 0):
        raise ConfigError(
            "activation_quant_params.search_range must be [start, stop] with 0 < start <= stop and "
            f"search_step > 0, got {list(params.search_range)} and {step}"
        )
    return [start + i * step for i in range(int(math.floor((stop - start) / step + 1e-9)) + 1)]


class IFMRObserver(_RangeObserver):
    """IFMR: percentile start, then an MSE search of the clip ends (see the module docs)."""

    def __init__(self, params: ActivationQuantParams, max_samples: int = 1 << 20) -> None:
        super().__init__(params)
        for key in ("max_percentile", "min_percentile"):
            value = getattr(params, key)
            if not 0.5 < value <= 1.0:
                raise ConfigError(f"activation_quant_params.{key} must be in (0.5, 1], got {value}")
        self._steps = _search_steps(params)
        if max_samples < 2:
            raise InputError(f"max_samples must be >= 2, got {max_samples}")
        self.max_samples = max_samples
        self._chunks: list[torch.Tensor] = []
        self._stride = 1

    @property
    def stored_samples(self) -> int:
        return sum(chunk.numel() for chunk in self._chunks)

    def update(self, x: torch.Tensor) -> None:
        """Record the batch's min/max and keep every ``stride``-th element of it."""
        seen = self._observe(x)
        if seen is None:
            return
        flat = seen[0]
        stored = self.stored_samples
        while stored + -(-flat.numel() // self._stride) > self.max_samples:
            self._stride *= 2
            if self._chunks:
                self._chunks = [torch.cat(self._chunks)[::2].clone()]
                stored = self._chunks[0].numel()
        self._chunks.append(flat[:: self._stride].clone())

    def compute(self) -> QParams:
        self._check_seen()
        data = torch.cat(self._chunks)
        p = self.params
        dmin, dmax = self.data_min, self.data_max
        hi0 = max(dmax if p.max_percentile == 1.0 else _quantile(data, p.max_percentile), 0.0)
        lo0 = min(dmin if p.min_percentile == 1.0 else _quantile(data, 1.0 - p.min_percentile), 0.0)
        if p.asymmetric:
            hi_cands = sorted({min(hi0 * s, dmax) for s in self._steps})
            lo_cands = sorted({max(lo0 * s, dmin) for s in self._steps})
            reach_lo, reach_hi = min(lo_cands[0], lo0), max(hi_cands[-1], hi0)
        else:
            lo0, hi0 = -max(-lo0, hi0), max(-lo0, hi0)
            hi_cands = sorted({min(hi0 * s, max(-dmin, dmax)) for s in self._steps})
            lo_cands = []
            reach_lo, reach_hi = -max(hi_cands[-1], hi0), max(hi_cands[-1], hi0)
        margin = 3.0 * (reach_hi - reach_lo) / (QMAX - QMIN)  # values beyond saturate for every candidate
        lo_h, hi_h = max(dmin, reach_lo - margin), min(dmax, reach_hi + margin)
        if hi_h <= lo_h:  # a single value: nothing to search
            return self._params(lo0, hi0)
        means, counts = _bin_moments(data, lo_h, hi_h, _IFMR_BINS)
        return _clip_search(
            p.asymmetric, lo0, hi0, lo_cands, hi_cands, lambda qps: _binned_sq_error(means, counts, qps)
        )


def _bin_moments(data: torch.Tensor, lo: float, hi: float, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and counts of the non-empty bins of [lo, hi] plus the two tail bins beyond it."""
    inv = bins / (hi - lo)
    idx = (data * inv).add_(1.0 - lo * inv).clamp_(0.0, bins + 1.0).long()
    counts = torch.bincount(idx, minlength=bins + 2)
    sums = torch.bincount(idx, weights=data, minlength=bins + 2)
    keep = counts > 0
    counts_kept = counts[keep].to(torch.float64)
    return (sums[keep].double() / counts_kept).float(), counts_kept


def _binned_sq_error(means: torch.Tensor, counts: torch.Tensor, qparams: list[QParams]) -> torch.Tensor:
    """Total squared qdq error per candidate, each bin's values taken at their mean."""
    scale = torch.tensor([s for s, _ in qparams], dtype=torch.float32).unsqueeze(1)
    offset = torch.tensor([o for _, o in qparams], dtype=torch.float32).unsqueeze(1)
    err = means - fake_quant(means, scale, offset)
    return (err * err).double() @ counts


class HFMGObserver(_RangeObserver):
    """HFMG: a mergeable histogram of ``num_of_bins`` bins and an L2 clip search."""

    def __init__(self, params: ActivationQuantParams) -> None:
        super().__init__(params)
        if params.num_of_bins < 2:
            raise ConfigError(f"activation_quant_params.num_of_bins must be >= 2, got {params.num_of_bins}")
        self.bins = params.num_of_bins
        self._counts: torch.Tensor | None = None
        self._lo = 0.0
        self._hi = 0.0
        self._zeros = 0  # elements seen while every value so far was 0 (no range yet)

    def _index(self, flat: torch.Tensor) -> torch.Tensor:
        width = (self._hi - self._lo) / self.bins
        return ((flat.double() - self._lo) / width).floor_().clamp_(0, self.bins - 1).long()

    def update(self, x: torch.Tensor) -> None:
        """Add the batch to the histogram, widening (and merging) it first if needed."""
        seen = self._observe(x)
        if seen is None:
            return
        flat, lo, hi = seen
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self._counts is None:
            if lo == hi:
                self._zeros += flat.numel()
                return
            self._lo, self._hi = lo, hi
            self._counts = torch.zeros(self.bins, dtype=torch.int64)
            self._counts[self._index(torch.zeros(1))] += self._zeros
        elif lo < self._lo or hi > self._hi:
            self._widen(lo, hi)
        self._counts += torch.bincount(self._index(flat), minlength=self.bins)

    def _widen(self, lo: float, hi: float) -> None:
        """Grow the range to hold [lo, hi]: new width = k * old width, edges on old edges."""
        assert self._counts is not None
        width = (self._hi - self._lo) / self.bins
        shift = max(0, math.ceil((self._lo - lo) / width))  # old bins added on the left
        factor = max(2, math.ceil((shift + (max(hi, self._hi) - self._lo) / width) / self.bins))
        target = (torch.arange(self.bins) + shift) // factor
        self._counts = torch.zeros_like(self._counts).index_add_(0, target, self._counts)
        self._lo -= shift * width
        self._hi = self._lo + self.bins * factor * width

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, edges)``: ``num_of_bins`` counts and ``num_of_bins + 1`` float64 edges."""
        self._check_seen()
        if self._counts is None:  # only zeros so far: all in bin 0 of the empty range [0, 0]
            counts = torch.zeros(self.bins, dtype=torch.int64)
            counts[0] = self._zeros
            return counts, torch.zeros(self.bins + 1, dtype=torch.float64)
        edges = torch.linspace(self._lo, self._hi, self.bins + 1, dtype=torch.float64)
        return self._counts.clone(), edges

    def compute(self) -> QParams:
        self._check_seen()
        dmin, dmax = self.data_min, self.data_max
        if self._counts is None or dmin == dmax:
            return self._params(dmin, dmax)
        counts, edges = self.histogram()
        inner = edges[1:-1]
        lo0, hi0 = min(dmin, 0.0), max(dmax, 0.0)
        if self.params.asymmetric:
            hi_cands = inner[(inner > 0) & (inner < dmax)].tolist() + [dmax] if dmax > 0 else [0.0]
            lo_cands = [dmin] + inner[(inner < 0) & (inner > dmin)].tolist() if dmin < 0 else [0.0]
        else:
            lo0, hi0 = -max(-dmin, dmax), max(-dmin, dmax)
            bounds = inner.abs()
            hi_cands = sorted(set(bounds[(bounds > 0) & (bounds < hi0)].tolist())) + [hi0]
            lo_cands = []
        clipped, weights = edges.clamp(dmin, dmax), counts.double()
        return _clip_search(
            self.params.asymmetric,
            lo0,
            hi0,
            lo_cands,
            hi_cands,
            lambda qps: _expected_sq_error(clipped, weights, qps),
        )


def _expected_sq_error(edges: torch.Tensor, counts: torch.Tensor, qparams: list[QParams]) -> torch.Tensor:
    """Expected total squared qdq error per candidate, each bin's count uniform over the bin."""
    scale = torch.tensor([s for s, _ in qparams], dtype=torch.float64).unsqueeze(1)
    offset = torch.tensor([o for _, o in qparams], dtype=torch.float64).unsqueeze(1)
    gmin, gmax, half = (QMIN - offset) * scale, (QMAX - offset) * scale, scale / 2
    lo_sat, hi_sat = gmin + half, gmax - half  # below / above these every value clamps
    # 3 * G(t), G an antiderivative of (t - qdq(t))**2 that is 0 at lo_sat, in three clamped pieces:
    # (t - gmin)**3 below lo_sat, a sawtooth of s**3/12 per step between, (t - gmax)**3 above hi_sat.
    low = torch.minimum(edges, lo_sat).sub_(gmin).pow_(3).sub_(half**3)
    high = torch.maximum(edges, hi_sat).sub_(gmax).pow_(3).add_(half**3)
    steps = edges.clamp(min=lo_sat, max=hi_sat).sub_(lo_sat).div_(scale)
    whole = steps.floor()
    antider = steps.sub_(whole).sub_(0.5).pow_(3).add_(0.125).add_(whole.div_(4)).mul_(scale**3)
    antider.add_(low).add_(high)
    width = edges[1:] - edges[:-1]
    mean_err = (antider[:, 1:] - antider[:, :-1]).div_(width.clamp(min=1e-300) * 3)
    point = width <= 0  # counts piled on a zero-width (clipped) bin sit at its edge
    if bool((point & (counts > 0)).any()):
        at = edges[:-1][point]
        mean_err[:, point] = (at - fake_quant(at, scale, offset)) ** 2
    return mean_err @ counts


def make_activation_observer(params: ActivationQuantParams) -> ActivationObserver:
    """An :class:`IFMRObserver` or :class:`HFMGObserver` as ``params.act_algo`` says."""
    if params.act_algo == "ifmr":
        return IFMRObserver(params)
    if params.act_algo == "hfmg":
        return HFMGObserver(params)
    raise ConfigError(f"activation_quant_params.act_algo must be 'ifmr' or 'hfmg', got {params.act_algo!r}")


def arq_quantize(
    weight: torch.Tensor, channel_wise: bool, axis: int = 0, num_bits: int = 8
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """ARQ: symmetric max-abs scales, one per channel along ``axis`` or one per tensor.

    ``num_bits`` 8 maps the largest magnitude to 127; 7 maps it to 63 (the values
    stay int8).  Offsets are all 0; an all-zero channel gets :data:`ZERO_RANGE_SCALE`.
    """
    if num_bits not in (7, 8):
        raise InputError(f"num_bits: expected 7 or 8, got {num_bits!r}")
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        raise InputError("weight must be a non-empty torch.Tensor")
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    if channel_wise:
        if not -w.dim() <= axis < w.dim():
            raise InputError(f"axis {axis} is out of range for a weight of shape {tuple(w.shape)}")
        bounds = w.movedim(axis, 0).reshape(w.shape[axis], -1).abs().amax(dim=1)
    else:
        bounds = w.abs().amax().reshape(1)
    if not bool(torch.isfinite(bounds).all()):
        raise InputError("weight holds NaN or Inf")
    qmax = 2 ** (num_bits - 1) - 1
    scales = tuple(_finish_scale(b / qmax) for b in bounds.tolist())
    return scales, (0,) * len(scales)
