"""The record file: bit-exact round trips and line-accurate errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from amct_opt.errors import ConfigError, InputError
from amct_opt.record import read_record, record_from_text, record_to_text, write_record
from amct_opt.types import LayerQuantFactors

GOLDEN = """\
record {
  key: "features.0.0"
  value {
    scale_d: 0.0123
    offset_d: -128
    scale_w: 0.001
    scale_w: 0.002
    offset_w: 0
    offset_w: 0
  }
}
"""


def bits(values: tuple[float, ...]) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


def test_golden_text() -> None:
    record = {"features.0.0": LayerQuantFactors(0.0123, -128, (0.001, 0.002), (0, 0))}
    assert record_to_text(record) == GOLDEN
    assert record_from_text(GOLDEN) == record


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    awkward = (0.1, 1 / 3, 1e-30, 5e-324, 1.7976931348623157e308, 0.030868463218212128, 2.0**-32)
    record = {
        "features.0.0": LayerQuantFactors(1 / 3, -128, awkward, (0, 1, -1, 127, -128, 5, 0)),
        'odd "name"\\with\nescapes\t': LayerQuantFactors(7e-7, 127, (0.25,), (0,)),
        "ünïcode.层": LayerQuantFactors(1.0, 0, (3.0, 4.0), (0, 0)),
    }
    path = tmp_path / "sub" / "record.txt"
    write_record(path, record)
    back = read_record(path)
    assert list(back) == list(record)
    for key, factors in record.items():
        assert back[key] == factors
        assert bits((back[key].scale_d, *back[key].scale_w)) == bits((factors.scale_d, *factors.scale_w))
    assert not [p for p in path.parent.iterdir() if p.name != "record.txt"]  # no temporary file left


def test_empty_record(tmp_path: Path) -> None:
    write_record(tmp_path / "r.txt", {})
    assert (tmp_path / "r.txt").read_text() == ""
    assert read_record(tmp_path / "r.txt") == {}


def test_protobuf_text_variants_are_accepted() -> None:
    text = """# written by hand
record: {
  value: { scale_w: [0.5, 0.25] offset_w: [0, 0] offset_d: 3 scale_d: 1e-2 }  # any order
  key: 'conv'
}
"""
    with pytest.raises(ConfigError, match="unexpected character"):
        record_from_text(text)  # single quotes are not supported
    factors = record_from_text(text.replace("'conv'", '"conv"'))["conv"]
    assert factors == LayerQuantFactors(0.01, 3, (0.5, 0.25), (0, 0))


def _entry(body: str, key: str = "a") -> str:
    return f'record {{\n  key: "{key}"\n  value {{\n{body}  }}\n}}\n'


OK_BODY = "    scale_d: 0.1\n    offset_d: 0\n    scale_w: 0.2\n    offset_w: 0\n"

MALFORMED = [
    # (text, line, fragment of the message)
    (_entry("    scale_d: 0.1\n    offset_d: 0\n    scale_w: 0.2\n"), 3, "1 scale_w but 0 offset_w"),
    (_entry("    offset_d: 0\n    scale_w: 0.2\n    offset_w: 0\n"), 3, "missing field 'scale_d'"),
    (_entry("    scale_d: 0.1\n    offset_d: 0\n"), 3, "missing field 'scale_w'"),
    (_entry(OK_BODY) + _entry(OK_BODY), 10, "duplicate key 'a' (first at line 1)"),
    (_entry(OK_BODY.replace("scale_d: 0.1", "scale_d: -0.1")), 4, "scale_d must be a finite number > 0"),
    (_entry(OK_BODY.replace("scale_w: 0.2", "scale_w: 0")), 6, "scale_w must be a finite number > 0"),
    (_entry(OK_BODY.replace("scale_d: 0.1", "scale_d: nan")), 4, "expected a number for 'scale_d'"),
    (_entry(OK_BODY.replace("offset_d: 0", "offset_d: 1.5")), 5, "expected an integer for 'offset_d'"),
    (
        _entry(OK_BODY.replace("offset_w: 0", "offset_w: 200")),
        7,
        "offset_w must be an integer in [-128, 127]",
    ),
    (_entry(OK_BODY + "    scale_d: 0.3\n"), 8, "duplicate field 'scale_d'"),
    (_entry(OK_BODY + "    shift_bit: 1\n"), 8, "expected one of scale_d, offset_d, scale_w, offset_w"),
    (_entry(OK_BODY.replace("scale_w: 0.2", "scale_w: [0.2 0.3]")), 6, "expected ',' or ']'"),
    (_entry(OK_BODY.replace("offset_d: 0", "offset_d 0")), 5, "expected ':' after 'offset_d'"),
    (_entry(OK_BODY)[:-2], 8, "got end of file"),
    ('record {\n  key: "a\n}\n', 2, "unterminated string"),
    ("record {\n  key: a\n}\n", 2, "expected a quoted layer name"),
    ('record {\n  key: "a\\q"\n}\n', 2, "unknown escape"),
    ('record {\n  key: "a"\n  key: "b"\n}\n', 3, "duplicate field 'key'"),
    ("record {\n  value {\n" + OK_BODY + "  }\n}\n", 1, "record is missing its key"),
    ('record {\n  key: "a"\n}\n', 1, "record is missing its value"),
    ('record {\n  key: "a"\n  name: 1\n}\n', 3, "expected 'key', 'value' or '}'"),
    ("\n\nrecrd {\n}\n", 3, "expected 'record' at the start of a layer entry"),
    ("record [\n", 1, "expected '{' after 'record'"),
    ("record {\n  @\n", 2, "unexpected character '@'"),
]


@pytest.mark.parametrize("text, line, fragment", MALFORMED)
def test_malformed_text_names_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        record_from_text(text)
    message = str(info.value)
    assert message.startswith(f"record_file: line {line}: "), message
    assert fragment in message, message


def test_read_record_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("record {\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"record_file '.*bad\.txt': line 1: .*end of file"):
        read_record(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_record(path)
    with pytest.raises(InputError, match="does not exist"):
        read_record(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "factors, fragment",
    [
        (LayerQuantFactors(0.1, 0, (0.0,), (0,)), "finite number > 0"),
        (LayerQuantFactors(0.1, 300, (0.1,), (0,)), "integer in [-128, 127]"),
    ],
)
def test_write_rejects_unusable_factors(tmp_path: Path, factors: LayerQuantFactors, fragment: str) -> None:
    with pytest.raises(InputError, match="layer 'x'") as info:
        write_record(tmp_path / "r.txt", {"x": factors})
    assert fragment in str(info.value)
    assert not (tmp_path / "r.txt").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((0.0, 0, (0.1,), (0,)), "scale_d: must be a finite positive number, got 0.0"),
        ((float("nan"), 0, (0.1,), (0,)), "scale_d: must be a finite positive number"),
        ((0.1, 0, (0.1, 0.2), (0,)), "scale_w/offset_w: must be non-empty and of equal length, got 2 and 1"),
        ((0.1, 0, (), ()), "scale_w/offset_w: must be non-empty"),
    ],
)
def test_factors_reject_bad_values_with_the_package_error(args: tuple, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        LayerQuantFactors(*args)
    assert fragment in str(info.value)
