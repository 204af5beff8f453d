"""A ranking-informed additive model of the loss, used to propose promising configs.

The loss of a config is modelled as the sum of a per-layer contribution over
its quantized layers.  The prior of each contribution comes from the
sensitivity ranking (a less similar layer is assumed to cost more), scaled to
the all-quantized loss; every evaluation refines it (Bayesian linear
regression).  Candidates solve the knapsack "quantize as much compute as
possible under a loss threshold" for the mean contributions at several
thresholds and for sampled contributions and thresholds; the one with the
largest expected gain (extra share times the chance to meet the target) is
proposed, and verified by a real evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["LossModel", "best_under_capacity"]

#: Capacity steps of the knapsack: its answer is within 1/CAPACITY_STEPS of the exact one.
CAPACITY_STEPS = 1000
#: Prior standard deviation of a contribution, relative to its prior mean.
PRIOR_SPREAD = 1.0
#: Prior contribution of the least sensitive layer, relative to the mean score gap.
PRIOR_FLOOR = 0.05
#: Thresholds at which the mean model's knapsack answers are candidates.
LEVELS = 9
#: Observation noise (non-additive effects), relative to the all-quantized loss.
NOISE = 0.02


def best_under_capacity(values: np.ndarray, weights: np.ndarray, capacity: float) -> np.ndarray:
    """0/1 vector maximising ``values @ x`` subject to ``weights @ x < capacity`` (weights >= 0).

    Weights are rounded up to ``capacity / CAPACITY_STEPS`` steps, so the
    answer always respects the capacity.
    """
    n = len(values)
    if capacity <= 0:
        return np.zeros(n, dtype=bool)
    steps = np.ceil(weights / capacity * CAPACITY_STEPS).astype(np.int64)
    room = CAPACITY_STEPS - 1
    best = np.zeros(room + 1)
    taken = np.zeros((n, room + 1), dtype=bool)
    for i in range(n):
        w = int(steps[i])
        if w > room:
            continue
        candidate = np.full(room + 1, -np.inf)
        candidate[w:] = best[: room + 1 - w] + values[i]
        taken[i] = candidate > best
        best = np.maximum(best, candidate)
    chosen = np.zeros(n, dtype=bool)
    cap = room
    for i in range(n - 1, -1, -1):
        if taken[i, cap]:
            chosen[i] = True
            cap -= int(steps[i])
    return chosen


class LossModel:
    """Per-layer loss contributions learnt from evaluations, with a prior from the ranking."""

    def __init__(
        self, layers: Sequence[str], weights: Mapping[str, float], scores: Mapping[str, float], seed: int | None
    ) -> None:
        self.layers = list(layers)
        self.values = np.array([float(weights[name]) for name in self.layers])
        raw = np.array([float(scores[name]) for name in self.layers])
        if not np.all(np.isfinite(raw)):
            raw = np.zeros(len(raw))
        # The built-in sensitivities are similarities in (0, 1], 1 meaning unchanged: 1 - score is
        # about the layer's relative output noise power, which adds up into the loss.
        damage = max(1.0, float(raw.max())) - raw
        floor = PRIOR_FLOOR * damage.mean() if damage.mean() > 0 else 1.0
        self.prior = damage + floor
        self.rng = np.random.default_rng(seed)
        self._rows: dict[tuple[bool, ...], tuple[float, bool]] = {}

    def add(self, key: tuple[bool, ...], loss: float, ok: bool) -> None:
        if math.isfinite(loss):
            self._rows[key] = (float(loss), bool(ok))

    def _data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = list(self._rows)
        x = np.array(keys, dtype=float).reshape(len(keys), len(self.layers))
        y = np.array([self._rows[k][0] for k in keys])
        ok = np.array([self._rows[k][1] for k in keys], dtype=bool)
        return x, y, ok

    def posterior(self) -> tuple[np.ndarray, np.ndarray, float] | None:
        """Mean and covariance of the contributions and the noise variance; None without a positive loss."""
        x, y, _ = self._data()
        base = x @ self.prior
        usable = base > 0
        if not usable.any() or float(y[usable] @ base[usable]) <= 0:
            return None
        scale = float(y[usable] @ base[usable]) / float(base[usable] @ base[usable])
        mean0 = scale * self.prior
        var0 = (PRIOR_SPREAD * mean0) ** 2
        noise = (NOISE * float(np.abs(y).max())) ** 2 or 1e-12
        precision = np.diag(1.0 / var0) + x.T @ x / noise
        cov = np.linalg.inv(precision)
        mean = cov @ (mean0 / var0 + x.T @ y / noise)
        return mean, (cov + cov.T) / 2, noise

    def thresholds(self) -> tuple[float, float] | None:
        """The loss range in which the target lies: (largest ok loss, smallest failing loss)."""
        _, y, ok = self._data()
        if ok.all():
            return None
        hi = float(y[~ok].min())
        lo = float(y[ok].max()) if ok.any() else 0.0
        return min(lo, hi), hi

    def propose(
        self, tried: set[tuple[bool, ...]], better_than: float, draws: int = 24
    ) -> tuple[bool, ...] | None:
        """The untried config with the largest expected gain over ``better_than``.

        Candidates are the knapsack answers for the mean contributions at
        several thresholds and for sampled contributions and thresholds; the
        gain of one is its extra share times its probability to meet the target.
        """
        posterior = self.posterior()
        bounds = self.thresholds()
        if posterior is None or bounds is None:
            return None
        mean, cov, noise = posterior
        lo, hi = bounds
        total = float(self.values.sum()) or 1.0
        candidates: dict[tuple[bool, ...], np.ndarray] = {}
        for frac in np.linspace(0.0, 1.0, LEVELS):
            chosen = best_under_capacity(self.values, np.clip(mean, 0.0, None), lo + frac * (hi - lo))
            candidates.setdefault(tuple(bool(v) for v in chosen), chosen)
        samples = self.rng.multivariate_normal(mean, cov, size=draws, method="eigh")
        for contributions, threshold in zip(samples, self.rng.uniform(lo, hi, size=draws)):
            chosen = best_under_capacity(self.values, np.clip(contributions, 0.0, None), float(threshold))
            candidates.setdefault(tuple(bool(v) for v in chosen), chosen)
        thresholds = np.linspace(lo, hi, 9)
        best_key, best_gain = None, 0.0
        for key, chosen in candidates.items():
            x = chosen.astype(float)
            gain = float(self.values @ x) / total - better_than
            if key in tried or gain <= 1e-12:
                continue
            sd = math.sqrt(float(x @ cov @ x) + noise) or 1e-12
            z = (thresholds - float(mean @ x)) / sd
            p_ok = float(np.mean([0.5 * math.erfc(-v / math.sqrt(2)) for v in z]))
            if gain * p_ok > best_gain:
                best_key, best_gain = key, gain * p_ok
        return best_key
