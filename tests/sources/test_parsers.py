"""Line parsers shared by serial and mqtt: what they read, and that garbage only ever raises
ParseError (the sources turn that into a dead-letter entry)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from collector.parsers import ParseError, ParserConfig, dotted_get, json_rows

PARSER = TypeAdapter(ParserConfig)


def parser(**cfg: object):  # type: ignore[no-untyped-def]
    return PARSER.validate_python(cfg)


def test_kv_reads_pairs_with_renames() -> None:
    p = parser(type="kv", rename={"T": "temperature"})
    assert p.parse("T=21.5 H=40") == [{"temperature": 21.5, "H": 40.0}]
    assert parser(type="kv", separator=":").parse("T:1;H:-2e1") == [{"T": 1.0, "H": -20.0}]


@pytest.mark.parametrize("line", ["T=", "=5", "T=abc", "T=1 T=2", "junk", "T=inf", "T=1 H"])
def test_kv_rejects_malformed(line: str) -> None:
    with pytest.raises(ParseError):
        parser(type="kv").parse(line)


def test_a_bare_parser_name_is_that_parser_with_its_defaults() -> None:
    assert PARSER.validate_python("kv").parse("T=21.5 H=40") == [{"T": 21.5, "H": 40.0}]
    assert PARSER.validate_python("json").parse('{"t": 1}') == [{"t": 1.0}]
    with pytest.raises(ValidationError, match="pattern"):  # regex needs its pattern
        PARSER.validate_python("regex")
    with pytest.raises(ValidationError, match="'kv'"):  # an unknown name lists the known ones
        PARSER.validate_python("xml")


def test_regex_named_groups_and_timestamp() -> None:
    p = parser(type="regex", pattern=r"(?P<ts>\S+) T:(?P<temperature>[-\d.]+)C")
    rows = p.parse("2024-05-01T10:00:00Z T:-3.5C")
    assert rows == [{"ts": datetime(2024, 5, 1, 10, tzinfo=UTC), "temperature": -3.5}]
    with pytest.raises(ParseError, match="does not match"):
        p.parse("T:3.5C")
    with pytest.raises(ParseError, match="ts"):
        p.parse("yesterday T:3.5C")


def test_regex_config_errors_are_validation_errors() -> None:
    with pytest.raises(ValidationError, match="not a regular expression"):
        parser(type="regex", pattern="(?P<x")
    with pytest.raises(ValidationError, match="named group"):
        parser(type="regex", pattern=r"\d+")


def test_csv_list_and_index_maps() -> None:
    p = parser(type="csv", columns=["pressure", "flow", None, "temp"])
    assert p.parse("1.5,2.5,x,40") == [{"pressure": 1.5, "flow": 2.5, "temp": 40.0}]
    with pytest.raises(ParseError, match="expected 4 columns"):
        p.parse("1,2,3")
    with pytest.raises(ParseError, match="flow"):
        p.parse("1,abc,3,4")
    q = parser(type="csv", columns={2: "c"}, delimiter=";")
    assert q.parse("a;b;7;d") == [{"c": 7.0}]
    with pytest.raises(ValidationError, match="metric"):
        parser(type="csv", columns=["ts", None])


def test_json_forms() -> None:
    p = parser(type="json")
    assert p.parse('{"t": 1, "label": "x", "nested": {"a": 1}}') == [{"t": 1.0}]
    assert p.parse('[{"metric": "t", "value": 2, "unit": "C"}, {"h": 3}]') == [
        {"metric": "t", "value": 2.0, "unit": "C"},
        {"h": 3.0},
    ]
    assert parser(type="json", metric="level").parse("4.5") == [{"metric": "level", "value": 4.5}]
    assert parser(type="json", json_path="$.data.0").parse('{"data": [{"x": 1}]}') == [{"x": 1.0}]
    for bad in [
        "{",
        "4.5",
        '{"metric": "t", "value": "high"}',
        "[]",
        '{"a": "b"}',
        "null",
        '{"t": 1, "ts": "not a time"}',
        '{"t": 1' + "0" * 400 + "}",  # an integer beyond float range
    ]:
        with pytest.raises(ParseError):
            p.parse(bad)


def test_dotted_get() -> None:
    assert dotted_get({"a": {"b": [1, 2]}}, "a.b.-1") == 2
    with pytest.raises(ParseError):
        dotted_get({"a": 1}, "a.b")


def test_json_rows_keeps_declared_tags() -> None:
    rows = json_rows({"t": 1, "site": "hall", "room": 7}, keep=frozenset({"site", "room"}))
    assert rows == [{"t": 1.0, "site": "hall", "room": "7"}]


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["kv", "csv", "json", "regex"]),
    line=st.one_of(
        st.text(max_size=80),
        st.binary(max_size=80).map(lambda b: b.decode("utf-8", "replace")),
        st.lists(
            st.sampled_from(
                [
                    "T",
                    "=",
                    "1",
                    ".",
                    "e",
                    " ",
                    ",",
                    "{",
                    "}",
                    '"',
                    ":",
                    "[",
                    "]",
                    "-",
                    "nan",
                    "inf",
                    "ts",
                ]
            ),
            max_size=30,
        ).map("".join),
    ),
)
def test_parsers_only_ever_raise_parse_error(kind: str, line: str) -> None:
    cfgs = {
        "kv": {"type": "kv"},
        "csv": {"type": "csv", "columns": ["a", "b"]},
        "json": {"type": "json", "metric": "x"},
        "regex": {"type": "regex", "pattern": r"(?P<a>.*)=(?P<b>.*)"},
    }
    p = parser(**cfgs[kind])
    try:
        rows = p.parse(line)
    except ParseError:
        return
    for row in rows:  # what is accepted is well-formed for normalize()
        for key, value in row.items():
            if key == "ts":
                assert isinstance(value, datetime) and value.tzinfo is not None
            elif key not in ("device", "unit", "metric"):
                assert value is None or isinstance(value, float)
