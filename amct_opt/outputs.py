"""Output paths of a run, validated up front, and the small JSON files it writes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_json, atomic_write_text, remove_stale_temps
from .errors import InputError

__all__ = ["OutputPaths", "NewFiles", "resolve_outputs", "as_input_tuple", "check_writable_dir"]

FINAL_CONFIG = "accuracy_based_auto_calibration_final_config.json"
RANKING = "accuracy_based_auto_calibration_ranking_information.json"
ROLL_BACK_RECORD = "accuracy_based_auto_calibration_record.json"
LOG_FILE = "amct_onnx.log"


@dataclass(frozen=True)
class OutputPaths:
    """Every file an auto-calibration run writes."""

    directory: Path
    prefix: str
    record_file: Path
    log_dir: Path

    @property
    def fake_quant_model(self) -> Path:
        return self.directory / f"{self.prefix}_fake_quant_model.onnx"

    @property
    def deploy_model(self) -> Path:
        return self.directory / f"{self.prefix}_deploy_model.onnx"

    @property
    def fusion_info(self) -> Path:
        return self.directory / f"{self.prefix}_quant.json"

    @property
    def final_config(self) -> Path:
        return self.directory / FINAL_CONFIG

    @property
    def ranking(self) -> Path:
        return self.directory / RANKING

    @property
    def roll_back_record(self) -> Path:
        return self.log_dir / ROLL_BACK_RECORD

    @property
    def log_file(self) -> Path:
        return self.log_dir / LOG_FILE

    def as_dict(self) -> dict[str, str]:
        names = ["fake_quant_model", "deploy_model", "fusion_info", "final_config", "ranking",
                 "record_file", "roll_back_record", "log_file"]
        return {name: str(getattr(self, name)) for name in names}

    def quantized_outputs(self) -> list[Path]:
        return [self.fake_quant_model, self.deploy_model, self.final_config]

    def remove_stale_temps(self) -> None:
        """Remove the temporary files that a run killed in the middle of a write left behind."""
        for path in self.as_dict().values():
            remove_stale_temps(path)


class NewFiles:
    """Files (and their folders) that do not exist yet: what a run that fails early must remove."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = [path for path in files if not path.exists()]
        folders: set[Path] = set()
        for path in self.files:
            parent = path.absolute().parent
            while not parent.exists():
                folders.add(parent)
                parent = parent.parent
        self.folders = sorted(folders, key=lambda folder: len(folder.parts), reverse=True)

    def remove(self, keep: Iterable[Path] = ()) -> None:
        """Remove the listed files created since, except ``keep``, then the new folders left empty."""
        kept = set(keep)
        for path in self.files:
            if path not in kept:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    path.unlink()
        for folder in self.folders:
            with contextlib.suppress(OSError):
                folder.rmdir()


def check_writable_dir(path: Path, argument: str) -> None:
    """Raise :class:`InputError` unless ``path`` is, or can become, a writable folder."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{argument}: {str(probe)!r} is a file, so folder {str(path)!r} cannot exist")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{argument}: folder {str(probe)!r} is not writable")


def resolve_outputs(save_dir: Any, record_file: Any, log_dir: str | Path = "amct_log") -> OutputPaths:
    """Validate ``save_dir`` (a folder plus a file-name prefix) and ``record_file``."""
    if not isinstance(save_dir, (str, os.PathLike)) or not str(save_dir):
        raise InputError(f"save_dir: expected a path like 'results/model', got {save_dir!r}")
    text = os.fspath(save_dir)
    if text.endswith(("/", os.sep)) or Path(text).name in ("", ".", ".."):
        raise InputError(
            f"save_dir: {text!r} has no file-name prefix; expected a folder plus a prefix, "
            "e.g. 'results/mobilenet_v2'"
        )
    if Path(text).is_dir():
        raise InputError(f"save_dir: {text!r} is a folder; expected a folder plus a file-name prefix")
    if not isinstance(record_file, (str, os.PathLike)) or not str(record_file):
        raise InputError(f"record_file: expected a file path, got {record_file!r}")
    record = Path(record_file)
    if record.is_dir():
        raise InputError(f"record_file: {str(record)!r} is a folder; expected a file path")
    directory = Path(text).parent
    check_writable_dir(directory.resolve(), "save_dir")
    check_writable_dir(record.parent.resolve(), "record_file")
    check_writable_dir(Path(log_dir).resolve(), "amct_log")
    return OutputPaths(directory, Path(text).name, record, Path(log_dir))


def as_input_tuple(input_data: Any) -> tuple[Any, ...]:
    """A tensor becomes ``(tensor,)``; a tuple/list must hold tensors (or None)."""
    if isinstance(input_data, torch.Tensor):
        return (input_data,)
    if isinstance(input_data, (tuple, list)) and input_data:
        bad = [i for i, item in enumerate(input_data) if not isinstance(item, torch.Tensor)]
        if bad:
            raise InputError(
                f"input_data[{bad[0]}]: expected a torch.Tensor, got "
                f"{type(input_data[bad[0]]).__name__}"
            )
        return tuple(input_data)
    raise InputError(
        f"input_data: expected a torch.Tensor or a non-empty tuple of tensors, got "
        f"{type(input_data).__name__}"
    )


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def write_ranking(path: Path, pairs: list[list[Any]]) -> None:
    """``[[layer, score], ...]`` with one pair per line."""
    atomic_write_text(path, "[\n" + ",\n".join(f"    {json.dumps(p)}" for p in pairs) + "\n]\n")
