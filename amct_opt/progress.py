"""Progress lines for a long search: trial count, best so far, ETA."""

from __future__ import annotations

import logging
import time

from .types import EvalResult

__all__ = ["SearchProgress"]

logger = logging.getLogger("amct_opt.search")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class SearchProgress:
    """Logs one line per evaluation; silent when ``enabled`` is False."""

    def __init__(self, enabled: bool = True, budget: int | None = None, n_layers: int = 0) -> None:
        self.enabled = enabled
        self.budget = budget
        self.n_layers = n_layers
        self.started = time.monotonic()
        self.evaluations = 0
        self.best_share: float | None = None
        #: ``time.monotonic()`` at which a timeout ends the search (None: no timeout).
        self.deadline: float | None = None

    def _emit(self, message: str, *args: object) -> None:
        if self.enabled:
            logger.info(message, *args)

    def evaluated(self, number: int, n_quantized: int, share: float, result: EvalResult, done: int) -> None:
        """Report one real evaluation; ``done`` counts the study's evaluations so far."""
        self.evaluations += 1
        if result.ok and (self.best_share is None or share > self.best_share):
            self.best_share = share
        best = "none yet" if self.best_share is None else f"{self.best_share:.1%}"
        eta = ""
        now = time.monotonic()
        left: float | None = None
        if self.budget:
            left = (now - self.started) / self.evaluations * max(0, self.budget - done)
        if self.deadline is not None:
            left = max(0.0, self.deadline - now) if left is None else min(left, max(0.0, self.deadline - now))
        if left is not None:
            eta = f" | ETA {_duration(left)}"
        of = f"/{self.budget}" if self.budget else ""
        self._emit(
            "[eval %d%s] trial %d: %d/%d layers int8, quantized share %.1f%%, metric %.6g, "
            "loss %.6g, %s | best feasible %s%s",
            done, of, number, n_quantized, self.n_layers, 100 * share, result.metric,
            result.loss, "ok" if result.ok else "FAILS target", best, eta,
        )

    def reused(self, number: int, source_number: int) -> None:
        self._emit("trial %d: same config as trial %d, reused its result", number, source_number)

    def note(self, message: str, *args: object) -> None:
        self._emit(message, *args)
