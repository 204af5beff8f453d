"""Validation of ``input_names``, ``output_names`` and ``dynamic_axes``, before any export work."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError

__all__ = ["DynamicAxes", "check_dynamic_axes", "check_names"]

#: ``{name: {axis: axis_name}}`` or ``{name: [axis, ...]}``, as ``torch.onnx.export`` takes it.
DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]]


def _is_axis(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_names(names: Sequence[str] | None, arg: str) -> None:
    """Raise :class:`InputError` unless ``names`` is None or a list of distinct non-empty strings."""
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise InputError(f"{arg}: expected a list of strings, got {type(names).__name__}")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise InputError(f"{arg}: every name must be a non-empty string, got {bad!r}")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise InputError(f"{arg}: duplicate names {duplicates}")


def _check_axes(name: str, axes: Any) -> None:
    if isinstance(axes, Mapping):
        for axis, axis_name in axes.items():
            if not _is_axis(axis) or not isinstance(axis_name, str) or not axis_name:
                raise InputError(
                    f"dynamic_axes[{name!r}]: expected {{axis (int >= 0): name (str)}}, "
                    f"got {axis!r}: {axis_name!r}"
                )
        return
    if isinstance(axes, str) or not isinstance(axes, Sequence):
        raise InputError(
            f"dynamic_axes[{name!r}]: expected a dict {{axis: name}} or a list of axes, "
            f"got {type(axes).__name__}"
        )
    if not all(_is_axis(axis) for axis in axes) or len(set(axes)) != len(axes):
        raise InputError(f"dynamic_axes[{name!r}]: expected distinct axes (int >= 0), got {list(axes)!r}")


def check_dynamic_axes(
    dynamic_axes: DynamicAxes | None,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
) -> None:
    """Raise :class:`InputError` if ``dynamic_axes`` is malformed or names an unknown tensor.

    Every key must be one of ``input_names`` or ``output_names`` (an export
    without names has nothing dynamic_axes can refer to).  Each value is either
    ``{axis: name}`` or a list of axes, exactly as ``torch.onnx.export`` takes.
    Cheap: call it before calibration or any other expensive work.

    Example:
        >>> check_dynamic_axes({"input": {0: "batch"}}, ["input"], ["logits"])
    """
    check_names(input_names, "input_names")
    check_names(output_names, "output_names")
    if dynamic_axes is None:
        return
    if not isinstance(dynamic_axes, Mapping):
        raise InputError(
            f"dynamic_axes: expected a dict keyed by tensor name, got {type(dynamic_axes).__name__}"
        )
    known = set(input_names or ()) | set(output_names or ())
    unknown = sorted(str(key) for key in dynamic_axes if key not in known)
    if unknown:
        raise InputError(
            f"dynamic_axes: {unknown} are neither input_names nor output_names (known names: {sorted(known)})"
        )
    for name, axes in dynamic_axes.items():
        _check_axes(name, axes)
