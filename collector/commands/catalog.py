"""Athena / Glue DDL for the S3 lake: the documented replacement for IoT Analytics datastores.

Tables use partition projection, so new partitions are queryable at once with no crawler,
``MSCK REPAIR`` or Glue partition API calls from the edge. Athena offers four projection types
(``enum``, ``integer``, ``date``, ``injected``); we map:

- ``date`` -> ``date`` projection (``yyyy-MM-dd``, from ``since`` to ``NOW``, 1 day);
- ``year``/``month``/``day``/``hour`` -> ``integer`` projection (fixed ranges, zero padded);
- column partitions (``metric``, ``device``, ``source``, tags) -> ``enum`` when the values are
  known (pass ``enums``), otherwise ``injected``: queries must then filter that column with
  ``=`` or ``IN`` (``WHERE metric = 'temperature'``), which is how the lake is meant to be read.

Partition values containing characters other than ``A-Za-z0-9_.-`` are percent-encoded in
paths (``sinks._partition.sanitize``); query them by their encoded spelling.

When the table has a ``partial`` column (window output), a view ``<table>_windows`` follows the
table: one row per window, the complete row (``partial = false``) superseding the partial rows a
stop wrote for the same window, else the partial row with the largest ``count`` (the same rule
as `collector export` and the dashboard).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from sinks._partition import DEFAULT_PARTITIONS, validate_partitions

READING_COLUMNS: dict[str, str] = {
    "ts": "timestamp",
    "device": "string",
    "source": "string",
    "metric": "string",
    "value": "double",
    "unit": "string",
    "record_id": "string",
}
"""Hive types of the canonical reading schema as the ``s3`` sink writes it."""

_INTEGER_RANGES = {"year": ("2020", "2100", 4), "month": ("1", "12", 2), "day": ("1", "31", 2),
                   "hour": ("0", "23", 2)}


def _q(name: str) -> str:
    """Backtick-quoted identifier (``date`` is reserved in Athena DDL)."""
    return "`" + name.replace("`", "``") + "`"


def _s(text: str) -> str:
    """Single-quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) from ``s3://bucket/prefix``."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    return bucket, prefix.strip("/")


def hive_type(dtype: pa.DataType) -> str:
    """The Athena/Hive column type that reads an Arrow type as written to Parquet.

    Nested types map recursively (``list<double>`` -> ``array<double>``, structs ->
    ``struct<name:type,…>``, maps -> ``map<k,v>``); a dictionary column is its value type;
    timestamps of any unit, with or without a zone, are ``timestamp`` (Parquet stores UTC
    instants; Athena reads them as UTC). A type Athena cannot read from Parquet is a
    ValueError naming it, never a silent ``string``.
    """
    t = pa.types
    if t.is_dictionary(dtype):
        return hive_type(dtype.value_type)
    if t.is_timestamp(dtype):
        return "timestamp"
    if t.is_boolean(dtype):
        return "boolean"
    if t.is_floating(dtype):
        return "double" if dtype.bit_width == 64 else "float"
    if t.is_integer(dtype):
        width = dtype.bit_width + (0 if t.is_signed_integer(dtype) else 1)
        if width <= 8:
            return "tinyint"
        if width <= 16:
            return "smallint"
        if width <= 32:
            return "int"
        if width <= 64:
            return "bigint"
        return "decimal(20,0)"  # uint64: Parquet UINT_64 does not fit a bigint
    if t.is_date(dtype):
        return "date"
    if t.is_decimal(dtype):
        return f"decimal({dtype.precision},{dtype.scale})"
    if t.is_string(dtype) or t.is_large_string(dtype) or _is(dtype, "is_string_view"):
        return "string"
    if t.is_binary(dtype) or t.is_large_binary(dtype) or t.is_fixed_size_binary(dtype):
        return "binary"
    if _is(dtype, "is_binary_view"):
        return "binary"
    if (
        t.is_list(dtype)
        or t.is_large_list(dtype)
        or t.is_fixed_size_list(dtype)
        or _is(dtype, "is_list_view")
        or _is(dtype, "is_large_list_view")
    ):
        return f"array<{hive_type(dtype.value_type)}>"
    if t.is_map(dtype):
        return f"map<{hive_type(dtype.key_type)},{hive_type(dtype.item_type)}>"
    if t.is_struct(dtype):
        fields = (dtype.field(i) for i in range(dtype.num_fields))
        return "struct<" + ",".join(f"{_field(f.name)}:{hive_type(f.type)}" for f in fields) + ">"
    if t.is_null(dtype):
        return "string"  # a column of nulls only: any type reads it
    if t.is_duration(dtype):
        return "bigint"  # Parquet keeps a duration as its integer count of units
    raise ValueError(f"Arrow type {dtype} has no Athena equivalent in Parquet")


def _field(name: str) -> str:
    """A struct field name as Hive DDL accepts it: plain, or backtick-quoted."""
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else _q(name)


def _is(dtype: pa.DataType, check: str) -> bool:
    """A ``pa.types`` check that older pyarrow versions lack counts as False."""
    fn = getattr(pa.types, check, None)
    return bool(fn(dtype)) if fn is not None else False


RECORD_ID_FORMAT = (
    "<device slug>-<instance id>-<first log offset:012d>-<last log offset:012d>[-<part:04d>]:<row>"
)
RECORD_ID_EXAMPLE = "edge-01-3f9a2c1b-000000000120-000000000131:7"


def record_id_comment(table: str, *, at_least_once: bool, database: str | None = None) -> str:
    """SQL ``--`` lines saying what ``record_id`` is and how to read each row once."""
    name = f"{_dq(database)}.{_dq(table)}" if database else _dq(table)
    lines = [
        f"-- record_id = {RECORD_ID_FORMAT}",
        f"--   e.g. {RECORD_ID_EXAMPLE}",
        "--   unique across the fleet (device slug, the data dir's instance id: README 'Fleet",
        "--   identity') and the same on every retry and replay: a reader can dedupe on it.",
    ]
    if at_least_once:
        lines += [
            "-- Delivery is at least once: a retried call can store a row twice. Read each row",
            f"-- once through the view {_dq(table + '_dedup')} below, or:",
            f"--   SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY \"record_id\")"
            f" AS rn FROM {name}) WHERE rn = 1",
        ]
    else:
        lines += [
            "-- A replayed batch overwrites its own object, so each row is stored once; a query",
            "-- that also reads another copy (e.g. a Firehose table) keeps one row per id with:",
            f"--   SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY \"record_id\")"
            f" AS rn FROM {name}) WHERE rn = 1",
        ]
    return "\n".join(lines) + "\n"


def dedup_view(
    table: str, columns: Sequence[str], database: str | None = None, order_by: str | None = None
) -> str:
    """``CREATE OR REPLACE VIEW <table>_dedup``: one row per ``record_id`` (at-least-once
    destinations such as Firehose)."""
    prefix = f"{_dq(database)}." if database else ""
    select_list = ", ".join(_dq(c) for c in columns)
    order = f" ORDER BY {_dq(order_by)}" if order_by else ""
    return (
        "-- one row per record_id: Firehose may deliver a record twice\n"
        f"CREATE OR REPLACE VIEW {prefix}{_dq(table + '_dedup')} AS\n"
        f"SELECT {select_list}\n"
        "FROM (\n"
        f"  SELECT *, row_number() OVER (PARTITION BY {_dq('record_id')}{order})"
        ' AS "record_copy"\n'
        f"  FROM {prefix}{_dq(table)}\n"
        ")\n"
        'WHERE "record_copy" = 1;\n'
    )


def columns_from_schema(schema: pa.Schema) -> dict[str, str]:
    """Hive columns of an Arrow schema, e.g. of a lake file (window aggregates, tags)."""
    return {f.name: hive_type(f.type) for f in schema}


def ddl(
    location: str,
    partitions: Sequence[str] = DEFAULT_PARTITIONS,
    columns: Mapping[str, str] | None = None,
    table: str = "readings",
    database: str | None = None,
    *,
    enums: Mapping[str, Sequence[str]] | None = None,
    since: str = "2020-01-01",
) -> str:
    """``CREATE EXTERNAL TABLE … PARTITIONED BY … STORED AS PARQUET`` with partition projection.

    ``location`` is ``s3://bucket/prefix``; ``partitions`` the sink's ``partition_by`` in
    order; ``columns`` the data columns (default: the canonical reading schema). Partition
    columns are left out of the data columns because Athena forbids a name in both lists (the
    files keep them too; Athena uses the path value, which is the same).
    """
    validate_partitions(partitions)
    bucket, prefix = parse_s3_url(location)
    root = f"s3://{bucket}/" + (f"{prefix}/" if prefix else "")
    cols = dict(columns if columns is not None else READING_COLUMNS)
    data_cols = [(n, t) for n, t in cols.items() if n not in partitions]
    enums = enums or {}
    props: list[tuple[str, str]] = [("parquet.compression", "ZSTD"), ("projection.enabled", "true")]
    for part in partitions:
        if part == "date":
            props += [
                ("projection.date.type", "date"),
                ("projection.date.format", "yyyy-MM-dd"),
                ("projection.date.range", f"{since},NOW"),
                ("projection.date.interval", "1"),
                ("projection.date.interval.unit", "DAYS"),
            ]
        elif part in _INTEGER_RANGES:
            lo, hi, digits = _INTEGER_RANGES[part]
            if part == "year":
                lo = since[:4]
            props += [
                (f"projection.{part}.type", "integer"),
                (f"projection.{part}.range", f"{lo},{hi}"),
                (f"projection.{part}.digits", str(digits)),
            ]
        elif part in enums:
            props += [
                (f"projection.{part}.type", "enum"),
                (f"projection.{part}.values", ",".join(enums[part])),
            ]
        else:
            props.append((f"projection.{part}.type", "injected"))
    template = root + "/".join(f"{p}=${{{p}}}" for p in partitions)
    props.append(("storage.location.template", template))

    def part_type(p: str) -> str:
        return "int" if p in _INTEGER_RANGES else "string"

    name = f"{_q(database)}.{_q(table)}" if database else _q(table)
    lines = []
    if "record_id" in cols:
        lines.append(record_id_comment(table, at_least_once=False, database=database).rstrip())
    lines.append(f"CREATE EXTERNAL TABLE IF NOT EXISTS {name} (")
    lines.append(",\n".join(f"  {_q(n)} {t}" for n, t in data_cols))
    lines.append(")")
    lines.append(
        "PARTITIONED BY (" + ", ".join(f"{_q(p)} {part_type(p)}" for p in partitions) + ")"
    )
    lines.append("STORED AS PARQUET")
    lines.append(f"LOCATION {_s(root)}")
    lines.append("TBLPROPERTIES (")
    lines.append(",\n".join(f"  {_s(k)}={_s(v)}" for k, v in props))
    lines.append(");")
    text = "\n".join(lines) + "\n"
    if "partial" in cols:
        text += "\n" + windows_view(table, cols, partitions, database)
    return text


_NOT_KEYS = {"record_id", "unit"}
_TIME_PARTS = {"date", "year", "month", "day", "hour"}


def _dq(name: str) -> str:
    """Double-quoted identifier, as Athena's query engine (Trino) wants in views."""
    return '"' + name.replace('"', '""') + '"'


def windows_view(
    table: str,
    columns: Mapping[str, str],
    partitions: Sequence[str] = (),
    database: str | None = None,
) -> str:
    """``CREATE OR REPLACE VIEW``: one row per window over a table of window rows.

    Rows sharing ``ts`` and every string column but ``record_id`` and ``unit`` (device, source,
    metric, tags, column partitions) are one window. A complete row (``partial = false``) hides
    the partial rows of its window; with no complete row, the partial row with the largest
    ``count`` (the last written, by ``record_id``, on a tie) stays. Rows whose ``partial`` is
    null (raw readings) are all kept. The view is ``<table>_windows``.
    """
    prefix = f"{_dq(database)}." if database else ""
    cols = dict(columns)
    names = [n for n in cols if n not in partitions] + list(partitions)
    keys = ["ts"] + [
        n
        for n in names
        if n not in _NOT_KEYS
        and n != "ts"
        and n not in _TIME_PARTS
        and (cols.get(n, "string") == "string")
    ]
    key_list = ", ".join(_dq(k) for k in keys)
    order = []
    if "count" in cols:
        order.append(f"{_dq('count')} DESC NULLS LAST")
    if "record_id" in cols:
        order.append(f"{_dq('record_id')} DESC NULLS LAST")
    order_by = f" ORDER BY {', '.join(order)}" if order else ""
    select_list = ", ".join(_dq(n) for n in names)
    return (
        "-- one row per window: a complete row supersedes the partial rows a stop wrote\n"
        f"CREATE OR REPLACE VIEW {prefix}{_dq(table + '_windows')} AS\n"
        f"SELECT {select_list}\n"
        "FROM (\n"
        "  SELECT *,\n"
        f"    coalesce(bool_or(NOT {_dq('partial')}) OVER (PARTITION BY {key_list}), false)"
        ' AS "window_has_complete",\n'
        f"    row_number() OVER (PARTITION BY {key_list}, {_dq('partial')}{order_by})"
        ' AS "window_rank"\n'
        f"  FROM {prefix}{_dq(table)}\n"
        ")\n"
        f"WHERE {_dq('partial')} IS NOT TRUE"
        ' OR (NOT "window_has_complete" AND "window_rank" = 1);\n'
    )


def ddl_firehose_json(
    location: str,
    columns: Mapping[str, str] | None = None,
    table: str = "readings_stream",
    database: str | None = None,
    *,
    since: str = "2020-01-01-00",
) -> str:
    """DDL for a Firehose S3 destination with the default ``YYYY/MM/DD/HH/`` prefix (NDJSON).

    ``ts`` stays a string (ISO 8601 with ``Z``): query ``from_iso8601_timestamp(ts)``.
    """
    bucket, prefix = parse_s3_url(location)
    root = f"s3://{bucket}/" + (f"{prefix}/" if prefix else "")
    cols = dict(columns if columns is not None else READING_COLUMNS)
    cols["ts"] = "string"
    name = f"{_q(database)}.{_q(table)}" if database else _q(table)
    head = record_id_comment(table, at_least_once=True, database=database) if (
        "record_id" in cols
    ) else ""
    props = [
        ("projection.enabled", "true"),
        ("projection.dt.type", "date"),
        ("projection.dt.format", "yyyy/MM/dd/HH"),
        ("projection.dt.range", f"{since.replace('-', '/')},NOW"),
        ("projection.dt.interval", "1"),
        ("projection.dt.interval.unit", "HOURS"),
        ("storage.location.template", root + "${dt}"),
    ]
    text = (
        head
        + f"CREATE EXTERNAL TABLE IF NOT EXISTS {name} (\n"
        + ",\n".join(f"  {_q(n)} {t}" for n, t in cols.items())
        + "\n)\nPARTITIONED BY (`dt` string)\n"
        "ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'\n"
        f"LOCATION {_s(root)}\n"
        "TBLPROPERTIES (\n"
        + ",\n".join(f"  {_s(k)}={_s(v)}" for k, v in props)
        + "\n);\n"
    )
    if "record_id" in cols:
        text += "\n" + dedup_view(table, [*cols, "dt"], database, order_by="dt")
    return text


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def ddl_for_sink(
    sink_config: Any,
    *,
    columns: Mapping[str, str] | None = None,
    enums: Mapping[str, Sequence[str]] | None = None,
    table: str | None = None,
    database: str | None = None,
) -> str:
    """DDL for an ``s3`` sink entry (its validated model or the raw mapping from YAML).

    The table is named after the sink (``name``, dashes -> underscores) unless ``table`` given.
    """
    kind = _get(sink_config, "type")
    if kind != "s3":
        raise ValueError(f"`collector catalog` describes `s3` sinks, not {kind!r}")
    bucket = _get(sink_config, "bucket")
    if not bucket:
        raise ValueError("the s3 sink has no `bucket`")
    prefix = str(_get(sink_config, "key_prefix", "") or "").strip("/")
    parts = list(_get(sink_config, "partition_by", None) or DEFAULT_PARTITIONS)
    name = table or str(_get(sink_config, "name", None) or "readings").replace("-", "_").replace(
        ".", "_"
    )
    location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return ddl(location, parts, columns, name, database, enums=enums)


def ddl_for_config(config: Any, **kwargs: Any) -> str:
    """DDL for every ``s3`` sink of a config, separated by blank lines.

    ``config`` is the loaded config (``collector.config.load``: its ``sinks`` are components
    whose ``.config`` is the validated model) or the raw mapping from YAML.

    Column partitions stay ``injected`` unless ``enums`` is given: metric names cannot be
    derived safely from sources, since transforms may add metrics and a missing enum value
    would hide data silently.
    """
    entries = [getattr(s, "config", s) for s in (_get(config, "sinks", None) or [])]
    sinks = [s for s in entries if _get(s, "type") == "s3"]
    if not sinks:
        raise ValueError("the config has no `s3` sink")
    return "\n".join(ddl_for_sink(s, **kwargs) for s in sinks)
