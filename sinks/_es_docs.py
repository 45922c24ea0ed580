"""Arrow rows -> bulk actions and the index template, shared by the Elasticsearch and OpenSearch
flavours of the ``elasticsearch`` sink.

Kept free of any client library so it imports (and is tested) on a bare install.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from collector.schema import RECORD_ID
from sinks._partition import bound_id

MAX_ID_BYTES = 512
"""Elasticsearch and OpenSearch refuse a longer ``_id``."""

TIME_SPECIFIERS = frozenset("YymdHjGVU%")
"""strftime codes allowed in ``index``: the ones Python and Polars (chrono) spell the same way,
so `collector check` can render the name exactly as the sink will."""
_SPEC_RE = re.compile(r"%(.)")
_INVALID_INDEX_CHARS = re.compile(r'[\\/*?"<>| ,#:A-Z]')
_SAMPLE_TIME = datetime(2024, 12, 31, 23, tzinfo=UTC)

KEYWORD_FIELDS = ("device", "source", "metric", "unit")
DOUBLE_FIELDS = ("value", "mean", "min", "max", "sum", "std", "count", "first", "last")
TS_FORMAT = "%Y-%m-%dT%H:%M:%S%.6fZ"


def check_index_name(name: str, what: str = "index") -> None:
    """ValueError unless ``name`` is a name Elasticsearch and OpenSearch both accept."""
    if not name:
        raise ValueError(f"{what} must not be empty")
    if name in {".", ".."} or name[0] in "-_+":
        raise ValueError(f"{what} {name!r} may not be '.', '..' or start with '-', '_' or '+'")
    bad = _INVALID_INDEX_CHARS.search(name)
    if bad:
        raise ValueError(
            f"{what} {name!r} contains {bad.group()!r}: index names are lowercase and may not "
            'contain \\ / * ? " < > | space , # :'
        )
    if len(name.encode()) > 255:
        raise ValueError(f"{what} {name!r} is longer than 255 bytes")


def check_index_pattern(pattern: str) -> None:
    """ValueError for a strftime code outside :data:`TIME_SPECIFIERS` or an invalid result."""
    for code in _SPEC_RE.findall(pattern):
        if code not in TIME_SPECIFIERS:
            allowed = ", ".join(f"%{c}" for c in sorted(TIME_SPECIFIERS))
            raise ValueError(f"index: %{code} is not supported; use {allowed}")
    if pattern.endswith("%") and not pattern.endswith("%%"):
        raise ValueError("index: a lone '%' at the end")
    check_index_name(_SAMPLE_TIME.strftime(pattern), "index (rendered)")


def template_pattern(index: str) -> str:
    """The glob an index template must match: the fixed prefix of ``index`` plus ``*``.

    ``sensors-%Y.%m.%d`` -> ``sensors-*``; a name without date codes matches only itself.
    """
    head, sep, _ = index.partition("%")
    return f"{head}*" if sep else index


def default_template_name(target: str) -> str:
    """A template name derived from the index or data stream, so two sinks do not collide."""
    stem = target.split("%", 1)[0].strip("-_.") or "sensors"
    return f"edge-collector-{stem}"


def index_template(pattern: str, *, data_stream: bool) -> dict[str, Any]:
    """Composable index template body: typed fields so Kibana/Dashboards work out of the box.

    ``ts`` is a date, the reading and every aggregate a double, ids and tags keywords. Dynamic
    templates cover aggregates and tag columns not named here; date detection is off so a tag
    that looks like a date still maps as keyword.
    """
    props: dict[str, Any] = {"ts": {"type": "date"}}
    if data_stream:
        props["@timestamp"] = {"type": "date"}
    props.update({f: {"type": "keyword", "ignore_above": 1024} for f in KEYWORD_FIELDS})
    props.update({f: {"type": "double"} for f in DOUBLE_FIELDS})
    props["partial"] = {"type": "boolean"}
    body: dict[str, Any] = {
        "index_patterns": [pattern],
        "priority": 200,
        "template": {
            "mappings": {
                "date_detection": False,
                "dynamic_templates": [
                    {"strings_as_keyword": {
                        "match_mapping_type": "string",
                        "mapping": {"type": "keyword", "ignore_above": 1024},
                    }},
                    {"integers_as_double": {
                        "match_mapping_type": "long", "mapping": {"type": "double"},
                    }},
                    {"floats_as_double": {
                        "match_mapping_type": "double", "mapping": {"type": "double"},
                    }},
                ],
                "properties": props,
            }
        },
        "_meta": {"managed_by": "edge-collector"},
    }
    if data_stream:
        body["data_stream"] = {}
    return body


@dataclass
class Actions:
    """The bulk actions of one batch, and rows refused before sending (``rejected``: row ->
    reason). ``rows[i]`` is the batch row of ``actions[i]``; results come back in that order."""

    actions: list[dict[str, Any]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)


def _non_finite_reasons(df: pl.DataFrame) -> dict[int, str]:
    """Rows holding +-inf: JSON has no spelling for it, one such row would fail the request."""
    out: dict[int, str] = {}
    for name, dtype in df.schema.items():
        if not dtype.is_float():
            continue
        bad = df.select(pl.col(name).is_infinite().fill_null(False).arg_true()).to_series()
        for row in bad.to_list():
            out.setdefault(row, f"non-finite value in field [{name}]: JSON cannot carry it")
    return out


def _jsonable(df: pl.DataFrame) -> pl.DataFrame:
    """Columns as JSON-native values, so serialising a bulk request can never fail on a type.

    Timestamps become ISO-8601 UTC strings (what the ``date`` mapping parses), dates and times
    ISO strings, durations seconds, decimals floats, binary base64, categoricals strings.
    """
    exprs: list[pl.Expr] = []
    for name, dtype in df.schema.items():
        col = pl.col(name)
        if isinstance(dtype, pl.Datetime):
            if dtype.time_zone is None:
                col = col.dt.replace_time_zone("UTC")
            exprs.append(col.dt.convert_time_zone("UTC").dt.strftime(TS_FORMAT))
        elif isinstance(dtype, pl.Duration):
            exprs.append(col.dt.total_microseconds() / 1e6)
        elif isinstance(dtype, pl.Decimal):
            exprs.append(col.cast(pl.Float64))
        elif dtype == pl.Binary:
            exprs.append(col.bin.encode("base64"))
        elif isinstance(dtype, pl.Date | pl.Time | pl.Categorical | pl.Enum | pl.Object):
            exprs.append(col.cast(pl.String) if not isinstance(dtype, pl.Object)
                         else col.map_elements(str, return_dtype=pl.String))
    return df.with_columns(exprs) if exprs else df


def build_actions(
    frame: pl.DataFrame,
    *,
    index: str,
    data_stream: str | None,
    use_record_id: bool,
) -> Actions:
    """One ``index`` (or, for a data stream, ``create``) action per row.

    ``_id`` is the row's ``record_id``, stable across retries, so a replayed batch overwrites
    (index) or is refused as a duplicate (create -> 409, which the sink counts as done).
    """
    df = frame
    rejected = _non_finite_reasons(df)
    ids = df.get_column(RECORD_ID).to_list() if RECORD_ID in df.columns else None
    if data_stream:
        targets: list[str] = [data_stream] * df.height
    elif "%" in index:
        targets = df.select(
            pl.col("ts").dt.convert_time_zone("UTC").dt.strftime(index)
        ).to_series().to_list()
    else:
        targets = [index] * df.height
    body = _jsonable(df.drop(RECORD_ID, strict=False))
    if data_stream and "ts" in body.columns:
        body = body.with_columns(pl.col("ts").alias("@timestamp"))
    body = body.with_columns(
        [pl.col(c).fill_nan(None) for c, t in body.schema.items() if t.is_float()]
    )
    op = "create" if data_stream else "index"
    out = Actions(rejected=rejected)
    for row, doc in enumerate(body.iter_rows(named=True)):
        if row in rejected:
            continue
        source = {k: v for k, v in doc.items() if v is not None}  # absent == null, and smaller
        action: dict[str, Any] = {"_op_type": op, "_index": targets[row], "_source": source}
        if use_record_id and ids is not None:
            action["_id"] = bound_id(str(ids[row]), MAX_ID_BYTES)
        out.actions.append(action)
        out.rows.append(row)
    return out

