"""The record file: per-layer quantization factors in the reference's protobuf text form.

::

    record {
      key: "features.0.0"
      value {
        scale_d: 0.0123
        offset_d: -128
        scale_w: 0.001
        offset_w: 0
      }
    }

Floats are written with ``repr`` so they read back bit-exactly.  The reader is
a small hand-written parser (no pickle, no protobuf); it also accepts what
protobuf text allows beside that: ``#`` comments, ``key``/``value`` in either
order, ``value: {``, and lists such as ``scale_w: [0.1, 0.2]``.  Every problem
raises :class:`~amct_opt.errors.ConfigError` naming ``record_file`` and a line.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_write_text
from .errors import ConfigError, InputError
from .fake_quant import QMAX, QMIN
from .types import LayerQuantFactors, Record

__all__ = ["write_record", "read_record", "record_to_text", "record_from_text"]

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "r": "\r", "t": "\t"}
_TOKEN = re.compile(
    r"""(?P<space>[ \t\r\f\v]+)|(?P<newline>\n)|(?P<comment>\#[^\n]*)
    |(?P<string>"(?:[^"\\\n]|\\.)*")|(?P<open_string>"[^\n]*)
    |(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[{}:\[\],])""",
    re.VERBOSE,
)
_INT = re.compile(r"[-+]?\d+")
_SCALARS = ("scale_d", "offset_d")
_LISTS = ("scale_w", "offset_w")


def _quote(key: str) -> str:
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in key) + '"'


def _check_scale(value: float, what: str) -> str | None:
    """Why ``value`` is not a usable scale, or None."""
    if not (math.isfinite(value) and value > 0):
        return f"{what} must be a finite number > 0, got {value!r}"
    return None


def _check_offset(value: int, what: str) -> str | None:
    if not QMIN <= value <= QMAX:
        return f"{what} must be an integer in [{QMIN}, {QMAX}], got {value}"
    return None


def record_to_text(record: Record) -> str:
    """The record file's text for ``record``, layers in the mapping's order."""
    lines: list[str] = []
    for key, factors in record.items():
        if not isinstance(key, str) or not isinstance(factors, LayerQuantFactors):
            raise InputError(
                f"record: expected str -> LayerQuantFactors, got {key!r} -> {type(factors).__name__}"
            )
        scales = [float(factors.scale_d), *(float(s) for s in factors.scale_w)]
        offsets = [int(factors.offset_d), *(int(o) for o in factors.offset_w)]
        problems = [_check_scale(s, "scale") for s in scales] + [_check_offset(o, "offset") for o in offsets]
        problem = next((p for p in problems if p), None)
        if problem:
            raise InputError(f"record: layer {key!r}: {problem}")
        lines += ["record {", f"  key: {_quote(key)}", "  value {"]
        lines += [f"    scale_d: {scales[0]!r}", f"    offset_d: {offsets[0]}"]
        lines += [f"    scale_w: {s!r}" for s in scales[1:]]
        lines += [f"    offset_w: {o}" for o in offsets[1:]]
        lines += ["  }", "}"]
    return "".join(line + "\n" for line in lines)


def write_record(path: str | os.PathLike[str], record: Record) -> None:
    """Write ``record`` to ``path`` atomically."""
    atomic_write_text(path, record_to_text(record))


def read_record(path: str | os.PathLike[str]) -> Record:
    """Read a record file written by :func:`write_record` (or by hand, in the same form)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"record_file: {os.fspath(path)!r} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"record_file: {os.fspath(path)!r} is a folder; expected a file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"record_file {os.fspath(path)!r}: not UTF-8 text ({exc.reason})") from None
    return record_from_text(text, source=f"record_file {os.fspath(path)!r}")


def record_from_text(text: str, source: str = "record_file") -> Record:
    """Parse record-file text; ``source`` names it in error messages."""
    return _Parser(text, source).parse()


@dataclass(frozen=True)
class _Token:
    kind: str  # "string", "number", "name", "punct" or "end"
    text: str
    line: int

    def describe(self) -> str:
        return "end of file" if self.kind == "end" else repr(self.text)


class _Parser:
    """Recursive descent over the tokens of one record file."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.tokens = self._tokenize(text)
        self.pos = 0

    def error(self, line: int, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: line {line}: {message}")

    def _tokenize(self, text: str) -> list[_Token]:
        tokens: list[_Token] = []
        line, pos = 1, 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                raise self.error(line, f"unexpected character {text[pos]!r}")
            kind = match.lastgroup or ""
            if kind == "open_string":
                raise self.error(line, "unterminated string; expected a closing '\"' on the same line")
            if kind == "newline":
                line += 1
            elif kind not in ("space", "comment"):
                tokens.append(_Token(kind, match.group(), line))
            pos = match.end()
        last_line = max(1, text.count("\n") + (not text.endswith("\n")))
        tokens.append(_Token("end", "", last_line))
        return tokens

    def next(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos = min(self.pos + 1, len(self.tokens) - 1)
        return token

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def expect(self, text: str, context: str) -> _Token:
        token = self.next()
        if token.text != text:
            raise self.error(token.line, f"expected {text!r} {context}, got {token.describe()}")
        return token

    def open_block(self, name: str) -> None:
        """``{`` or ``: {`` after a message field name."""
        if self.peek().text == ":":
            self.next()
        self.expect("{", f"after {name!r}")

    def parse(self) -> Record:
        record: Record = {}
        lines: dict[str, int] = {}
        while self.peek().kind != "end":
            start = self.expect("record", "at the start of a layer entry")
            self.open_block("record")
            key, factors = self.parse_entry(start.line)
            if key in record:
                raise self.error(start.line, f"duplicate key {key!r} (first at line {lines[key]})")
            record[key], lines[key] = factors, start.line
        return record

    def parse_entry(self, line: int) -> tuple[str, LayerQuantFactors]:
        key: str | None = None
        factors: LayerQuantFactors | None = None
        while (token := self.next()).text != "}" or token.kind != "punct":
            if token.kind == "name" and token.text == "key" and key is None:
                self.expect(":", "after 'key'")
                key = self.parse_string()
            elif token.kind == "name" and token.text == "value" and factors is None:
                self.open_block("value")
                factors = self.parse_value(token.line)
            elif token.text in ("key", "value"):
                raise self.error(token.line, f"duplicate field {token.text!r} in this record")
            else:
                raise self.error(token.line, f"expected 'key', 'value' or '}}', got {token.describe()}")
        if key is None or factors is None:
            raise self.error(line, f"record is missing its {'key' if key is None else 'value'}")
        return key, factors

    def parse_string(self) -> str:
        token = self.next()
        if token.kind != "string":
            raise self.error(token.line, f"expected a quoted layer name after 'key:', got {token.describe()}")
        out: list[str] = []
        chars = iter(token.text[1:-1])
        for ch in chars:
            if ch == "\\":
                esc = next(chars)
                if esc not in _UNESCAPES:
                    raise self.error(token.line, f"unknown escape '\\{esc}' in a string")
                ch = _UNESCAPES[esc]
            out.append(ch)
        return "".join(out)

    def parse_number(self, field: str) -> tuple[float | int, int]:
        token = self.next()
        if token.kind != "number":
            raise self.error(token.line, f"expected a number for {field!r}, got {token.describe()}")
        if field.startswith("offset"):
            if not _INT.fullmatch(token.text):
                raise self.error(token.line, f"expected an integer for {field!r}, got {token.text!r}")
            return int(token.text), token.line
        return float(token.text), token.line

    def parse_values(self, field: str) -> list[tuple[float | int, int]]:
        """One number, or a ``[a, b, ...]`` list, after ``field:``."""
        if self.peek().text != "[":
            return [self.parse_number(field)]
        self.next()
        values = []
        while True:
            values.append(self.parse_number(field))
            token = self.next()
            if token.text == "]":
                return values
            if token.text != ",":
                raise self.error(
                    token.line, f"expected ',' or ']' in the {field!r} list, got {token.describe()}"
                )

    def parse_value(self, line: int) -> LayerQuantFactors:
        found: dict[str, list[tuple[float | int, int]]] = {name: [] for name in _SCALARS + _LISTS}
        while (token := self.next()).text != "}" or token.kind != "punct":
            if token.kind != "name" or token.text not in found:
                raise self.error(
                    token.line, f"expected one of {', '.join(found)} or '}}', got {token.describe()}"
                )
            self.expect(":", f"after {token.text!r}")
            if token.text in _SCALARS and found[token.text]:
                raise self.error(token.line, f"duplicate field {token.text!r}")
            values = (
                [self.parse_number(token.text)] if token.text in _SCALARS else self.parse_values(token.text)
            )
            found[token.text] += values
        for name in _SCALARS + ("scale_w",):
            if not found[name]:
                raise self.error(line, f"value is missing field {name!r}")
        if len(found["scale_w"]) != len(found["offset_w"]):
            raise self.error(
                line,
                f"value has {len(found['scale_w'])} scale_w but {len(found['offset_w'])} offset_w; "
                "expected one offset_w per scale_w",
            )
        for name, values in found.items():
            for value, at in values:
                problem = (
                    _check_scale(value, name) if name.startswith("scale") else _check_offset(int(value), name)
                )
                if problem:
                    raise self.error(at, problem)
        return LayerQuantFactors(
            scale_d=float(found["scale_d"][0][0]),
            offset_d=int(found["offset_d"][0][0]),
            scale_w=tuple(float(v) for v, _ in found["scale_w"]),
            offset_w=tuple(int(v) for v, _ in found["offset_w"]),
        )
