"""The reference's BinarySearch over the sensitivity ranking."""

from __future__ import annotations

from typing import Any

from .base import AutoCalibrationStrategyBase, check_study_location

__all__ = ["BinarySearch"]


class BinarySearch(AutoCalibrationStrategyBase):
    """Roll back the ``mid + 1`` most sensitive layers; bisect on ``mid``.

    Index ``mid`` means: positions ``0..mid`` of the most-sensitive-first order
    are kept float.  A failing config moves ``left`` to ``mid + 1``, a passing
    one moves ``right`` to ``mid - 1`` and is remembered.  The search stops when
    ``left > right`` with the last passing config: at most ``floor(log2 n) + 1``
    evaluations after the all-quantized one.

    Args:
        storage: where the study lives: a SQLAlchemy URL (``sqlite:///…``,
            ``postgresql+psycopg://…``, ``mysql+pymysql://…``) or an Optuna
            storage.  None: ``amct_opt.db`` beside the outputs.
        study_name: the study's name.  None: the output prefix.
        show_progress: log a line per evaluation (count, best so far).
    """

    def __init__(self, *, storage: Any = None, study_name: str | None = None, show_progress: bool = True) -> None:
        check_study_location(storage, study_name)
        self.storage = storage
        self.study_name = study_name
        self.show_progress = bool(show_progress)
        self._order: list[str] = []
        self._left = 0
        self._right = -1
        self._mid: int | None = None
        self._best: int | None = None

    def initialize(self, ranking: dict[str, float]) -> None:
        self._order = sorted(ranking, key=lambda name: (ranking[name], name))
        self._left, self._right = 0, len(self._order) - 1
        self._mid = None
        self._best = None

    def _config(self, mid: int) -> dict[str, bool]:
        return {name: index > mid for index, name in enumerate(self._order)}

    def update_quant_config(self, metric_eval_result: tuple[bool, float]) -> dict[str, Any]:
        ok = bool(metric_eval_result[0])
        if self._mid is None and ok:
            return {"stop_flag": True, "roll_back_config": self._config(-1)}
        if self._mid is not None:
            if ok:
                self._best = self._mid
                self._right = self._mid - 1
            else:
                self._left = self._mid + 1
        if self._left > self._right:
            final = None if self._best is None else self._config(self._best)
            return {"stop_flag": True, "roll_back_config": final}
        self._mid = (self._left + self._right) // 2
        return {"stop_flag": False, "roll_back_config": self._config(self._mid)}
