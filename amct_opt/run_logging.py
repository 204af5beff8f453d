"""The run's log file (``amct_log/amct_onnx.log``) and console output."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import optuna

from .storage import mask_secrets

__all__ = ["log_to_file"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _MaskSecrets(logging.Filter):
    """Masks URL passwords in every record that passes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_secrets(record.getMessage())
        record.args = None
        return True


@contextlib.contextmanager
def log_to_file(path: Path, console: bool = True) -> Iterator[None]:
    """Log ``amct_opt`` to ``path``; also to stderr when nobody configured logging."""
    logger = logging.getLogger("amct_opt")
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(path, encoding="utf-8")]
    handlers[0].setFormatter(logging.Formatter(_FORMAT))
    if console and not logging.getLogger().handlers and not logger.handlers:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s amct_opt: %(message)s", "%H:%M:%S"))
        handlers.append(stream)
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mask = _MaskSecrets()
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    for handler in handlers:
        handler.addFilter(mask)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(old_level)
        optuna.logging.set_verbosity(optuna_level)
