"""Line and payload parsers shared by the `serial` and `mqtt` sources.

A parser turns one text line (or one JSON document) into reading rows in the forms
``collector.schema.normalize`` accepts, or raises ``ParseError`` with a reason. Rows are checked
here (numeric values, readable timestamps), so a malformed input is rejected on its own and never
fails a whole tick further down the pipeline.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from collector.plugin import Model
from collector.schema import to_utc

Row = dict[str, Any]
_TS_KEYS = ("ts", "time", "timestamp")
_META_KEYS = {*_TS_KEYS, "device", "unit"}


class ParseError(ValueError):
    """The input is not what the parser was configured for; the message is the reason."""


def _number(value: Any, what: str) -> float | None:
    """A finite float or None, or ParseError: a reading's value must be numeric."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        try:
            f = float(value)
        except OverflowError:
            raise ParseError(f"{what}: {str(value)[:40]}… is out of float range") from None
    elif isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            raise ParseError(f"{what}: {value[:40]!r} is not a number") from None
    else:
        raise ParseError(f"{what}: a {type(value).__name__} is not a number")
    if math.isinf(f):
        raise ParseError(f"{what}: infinite value")
    return None if math.isnan(f) else f


def _check_ts(row: Row) -> None:
    for key in _TS_KEYS:
        if key in row:
            try:
                row[key] = to_utc(row[key])
            except (ValueError, TypeError, OverflowError, OSError) as exc:
                raise ParseError(f"{key}: {exc}") from None
            return


def wide_row(values: Mapping[str, Any], rename: Mapping[str, str]) -> Row:
    """A wide row {metric: float} from text fields, keeping ts/device/unit as they are."""
    row: Row = {}
    for key, raw in values.items():
        if raw is None:
            continue
        if key in _META_KEYS:
            row[key] = raw
            continue
        row[rename.get(key, key)] = _number(raw, key)
    _check_ts(row)
    if not any(k not in _META_KEYS for k in row):
        raise ParseError("no metric in the input")
    return row


def json_rows(
    doc: Any,
    *,
    rename: Mapping[str, str] | None = None,
    metric: str | None = None,
    keep: frozenset[str] = frozenset(),
) -> list[Row]:
    """Rows from a decoded JSON document: a narrow row, a wide row, a list of them, or a number.

    Narrow: ``{"metric": "t", "value": 21.5, "ts": ...}``. Wide: ``{"t": 21.5, "h": 40}``: numeric
    fields become metrics, nested objects/lists and strings are ignored except ``keep`` (tags)
    and ``device``/``unit``. A bare number needs ``metric`` (its name).
    """
    rename = rename or {}
    if isinstance(doc, list):
        if not doc:
            raise ParseError("empty list")
        rows: list[Row] = []
        for item in doc:
            if isinstance(item, list):
                raise ParseError("nested lists are not readings")
            rows.extend(json_rows(item, rename=rename, metric=metric, keep=keep))
        return rows
    if not isinstance(doc, Mapping):
        if not isinstance(doc, int | float | str):
            raise ParseError(f"a JSON {type(doc).__name__} is not a reading")
        if metric is None:
            raise ParseError("a bare value needs `metric` to name it")
        return [{"metric": metric, "value": _number(doc, metric)}]
    if "metric" in doc:
        name = doc["metric"]
        if not isinstance(name, str) or not name:
            raise ParseError("`metric` must be a non-empty string")
        row: Row = {k: v for k, v in doc.items() if k in _META_KEYS or k in keep}
        row["metric"] = rename.get(name, name)
        row["value"] = _number(doc.get("value"), name)
        if "unit" in row and row["unit"] is not None and not isinstance(row["unit"], str):
            raise ParseError("`unit` must be a string")
        _check_ts(row)
        return [row]
    row = {}
    for key, value in doc.items():
        if key in _META_KEYS or key in keep:
            if key in keep and not isinstance(value, str):
                value = str(value)
            row[key] = value
        elif isinstance(value, int | float) or value is None:
            row[rename.get(key, key)] = _number(value, key)
    _check_ts(row)
    if "device" in row and not isinstance(row["device"], str):
        row["device"] = str(row["device"])
    if not any(k not in _META_KEYS and k not in keep for k in row):
        raise ParseError("no numeric field in the object")
    return [row]


def dotted_get(doc: Any, path: str | None) -> Any:
    """``doc`` at a dotted path such as ``$.payload.readings`` or ``data.0.value`` (list index)."""
    if not path:
        return doc
    parts = path.removeprefix("$").lstrip(".").split(".") if path != "$" else []
    for part in parts:
        if isinstance(doc, Mapping) and part in doc:
            doc = doc[part]
        elif (
            isinstance(doc, list)
            and part.lstrip("-").isdigit()
            and -len(doc) <= int(part) < len(doc)
        ):
            doc = doc[int(part)]
        else:
            raise ParseError(f"path {path!r}: no {part!r}")
    return doc


class _ParserBase(Model):
    rename: dict[str, str] = Field(
        default_factory=dict, description="Metric renames, e.g. `{T: temperature}`."
    )

    def parse(self, line: str) -> list[Row]:
        raise NotImplementedError


class RegexParser(_ParserBase):
    """Named groups of one regular expression: each group is a metric (ts/device/unit special)."""

    type: Literal["regex"] = Field(description="Parser kind.")
    pattern: str = Field(
        description="Python regex with named groups, matched against the whole line, e.g. "
        r"`T:(?P<temperature>[-\d.]+) H:(?P<humidity>[-\d.]+)`."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if not set(compiled.groupindex) - _META_KEYS:
            raise ValueError("the pattern needs at least one named group, e.g. (?P<temperature>…)")
        return value

    def parse(self, line: str) -> list[Row]:
        m = re.fullmatch(self.pattern, line)
        if m is None:
            raise ParseError("line does not match the pattern")
        return [wide_row(m.groupdict(), self.rename)]


class CsvParser(_ParserBase):
    """Delimited columns: a list of names by position (null skips a column) or index → name."""

    type: Literal["csv"] = Field(description="Parser kind.")
    columns: list[str | None] | dict[int, str] = Field(
        description="Column names by position (`[ts, temperature, null, humidity]`) or a map "
        "`{1: temperature, 3: humidity}` (0-based). `ts`, `device`, `unit` are special."
    )
    delimiter: str = Field(default=",", min_length=1, max_length=1, description="Separator.")
    strict: bool = Field(
        default=True, description="Reject lines whose column count differs from the map."
    )

    def _by_index(self) -> dict[int, str]:
        if isinstance(self.columns, dict):
            return dict(self.columns)
        return {i: c for i, c in enumerate(self.columns) if c}

    @model_validator(mode="after")
    def _has_metric(self) -> CsvParser:
        if not set(self._by_index().values()) - _META_KEYS:
            raise ValueError("columns: name at least one metric column")
        return self

    def parse(self, line: str) -> list[Row]:
        try:
            fields = next(csv.reader(io.StringIO(line), delimiter=self.delimiter, strict=True))
        except (csv.Error, StopIteration) as exc:
            raise ParseError(f"not a {self.delimiter!r}-delimited line: {exc}") from None
        index = self._by_index()
        width = len(self.columns) if isinstance(self.columns, list) else max(index) + 1
        if (self.strict and isinstance(self.columns, list) and len(fields) != width) or (
            len(fields) < width
        ):
            raise ParseError(f"expected {width} columns, got {len(fields)}")
        return [wide_row({name: fields[i] for i, name in index.items()}, self.rename)]


class JsonParser(_ParserBase):
    """One JSON document per line: narrow, wide, a list of those, or a bare number."""

    type: Literal["json"] = Field(description="Parser kind.")
    json_path: str | None = Field(
        default=None, description="Dotted path to the readings inside the document, e.g. `data`."
    )
    metric: str | None = Field(default=None, description="Metric name of a bare-number document.")

    def parse(self, line: str) -> list[Row]:
        try:
            doc = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ParseError(f"not JSON: {exc}") from None
        return json_rows(dotted_get(doc, self.json_path), rename=self.rename, metric=self.metric)


class KvParser(_ParserBase):
    """``key=value`` pairs such as ``T=21.5 H=40`` (any whitespace, `,` or `;` between pairs)."""

    type: Literal["kv"] = Field(description="Parser kind.")
    separator: str = Field(
        default="=", min_length=1, description="Between a key and its value (`=` or `:`)."
    )

    def parse(self, line: str) -> list[Row]:
        pairs: dict[str, str] = {}
        for token in re.split(r"[\s,;]+", line.strip()):
            if not token:
                continue
            key, sep, value = token.partition(self.separator)
            if not sep or not key or not value:
                raise ParseError(f"{token[:40]!r} is not key{self.separator}value")
            if key in pairs:
                raise ParseError(f"key {key[:40]!r} appears twice")
            pairs[key] = value
        if not pairs:
            raise ParseError("no key=value pair")
        return [wide_row(pairs, self.rename)]


_Parsers = Annotated[RegexParser | CsvParser | JsonParser | KvParser, Field(discriminator="type")]
ParserName = Literal["regex", "csv", "json", "kv"]


def _parser_shorthand(value: Any) -> Any:
    """`parser: kv` is `parser: {type: kv}` (the bare name Telegraf and Vector users write)."""
    return {"type": value} if isinstance(value, str) else value


ParserConfig = Annotated[
    _Parsers,
    BeforeValidator(_parser_shorthand, json_schema_input_type=ParserName | _Parsers),
]
"""The `parser:` block of a source: `{type: regex|csv|json|kv, …options}`, or just the name
(`kv`, `json`) when the defaults do."""
