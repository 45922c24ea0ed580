"""The canonical narrow reading schema and the conversions every plugin boundary uses.

One narrow schema (ts, device, source, metric, value, unit, tags) keeps filters, windows, the lake
and the dashboard generic: a new sensor is new rows, never new columns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import polars as pl

KEY_COLUMNS = ("device", "source", "metric")
RECORD_ID = "record_id"
"""Column the runtime adds when it cuts a batch: ``<batch id>:<row>``, stable across retries."""

POLARS_SCHEMA: dict[str, pl.DataType] = {
    "ts": pl.Datetime("us", "UTC"),
    "device": pl.String(),
    "source": pl.String(),
    "metric": pl.String(),
    "value": pl.Float64(),
    "unit": pl.String(),
}

_RESERVED = {"ts", "time", "timestamp", "device", "source", "metric", "value", "unit"}


def empty_readings(tags: Iterable[str] = ()) -> pl.DataFrame:
    """An empty frame of the canonical schema (used to type-check SQL at ``collector check``)."""
    schema = dict(POLARS_SCHEMA)
    schema.update({t: pl.String() for t in tags})
    return pl.DataFrame(schema=schema)


def to_utc(ts: Any) -> datetime:
    """Timezone-aware UTC datetime from a datetime, epoch seconds or ISO string."""
    if isinstance(ts, datetime):
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    if isinstance(ts, int | float):
        return datetime.fromtimestamp(ts, UTC)
    if isinstance(ts, str):
        return to_utc(datetime.fromisoformat(ts.replace("Z", "+00:00")))
    raise ValueError(f"cannot read a timestamp from {ts!r}")


MISSING_TEXT = ("", "na", "n/a", "nan", "null", "none", "-")
"""Texts (compared stripped, lower-case) that mean 'no reading': a null value, never a reject."""

Reject = Callable[[Any, str], None]
"""Where a bad row/value goes with its reason (a source's ``ctx.reject``: the dead letter)."""


class RejectedValue(ValueError):
    """A value or row that can never become a reading; the message is the reason."""


def _as_float(value: Any) -> float | None:
    """A finite float, or None for 'no reading', or RejectedValue saying why not.

    NaN, None, empty text and the `MISSING_TEXT` markers are 'no reading' (null). ±inf is
    rejected: JSON has no infinity (Elasticsearch, Firehose and IoT Analytics would refuse the
    whole batch) and it poisons every mean of its window. Integers beyond float range (10**400)
    are rejected rather than rounded to infinity. Booleans are 0/1.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in MISSING_TEXT:
            return None
        try:
            f = float(text)
        except ValueError:
            raise RejectedValue(f"{text[:40]!r} is not a number") from None
    elif isinstance(value, Mapping | list | tuple | set):
        raise RejectedValue(f"a nested value ({type(value).__name__}) is not a number")
    else:
        try:
            f = float(value)
        except OverflowError:
            raise RejectedValue("out of float range") from None
        except (TypeError, ValueError):
            raise RejectedValue(f"a {type(value).__name__} is not a number") from None
    if math.isinf(f):
        raise RejectedValue("not finite (inf)")
    return None if math.isnan(f) else f


def _raw(item: Any) -> str:
    """The bad input as text for the dead letter: JSON where possible, else its repr."""
    try:
        return json.dumps(item, default=str)
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(item)
        except Exception:  # a user object whose repr fails still leaves a trace
            return f"<{type(item).__name__}>"


def _rejecter(reject: Reject | None) -> Reject:
    """``reject`` itself, or (None: the caller wants errors) one that raises the reason."""
    if reject is not None:
        return reject

    def _raise(_raw_item: Any, reason: str) -> None:
        raise RejectedValue(reason)

    return _raise


def _metric_name(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise RejectedValue("no metric name" if value in (None, "") else "metric must be text")


def rows_to_frame(
    rows: Iterable[Mapping[str, Any]],
    *,
    device: str,
    source: str,
    now: datetime,
    units: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    reject: Reject | None = None,
) -> pl.DataFrame:
    """Narrow rows from either form a source may return.

    Narrow: ``{"metric": "temperature", "value": 21.5}``; wide: ``{"temperature": 21.5,
    "humidity": 40}`` (one row per numeric field; text fields are labels and are skipped).
    ``ts`` defaults to ``now``; ``device``, ``unit`` and tag keys given in a row win over the
    defaults.

    One bad row or value costs only itself: with ``reject`` it is handed there (raw row as
    JSON text, reason) and the other rows go on; without, RejectedValue is raised. Bad: a row
    that is not a dict, an unreadable ``ts``, a missing metric name, a value that is text,
    nested, infinite or beyond float range (see ``_as_float``).
    """
    units = units or {}
    tags = dict(tags or {})
    bad = _rejecter(reject)
    out: list[dict[str, Any]] = []
    for row in rows:
        if not isinstance(row, Mapping):
            bad(_raw(row), f"a {type(row).__name__} is not a reading (a dict)")
            continue
        try:
            ts = to_utc(row.get("ts", row.get("time", row.get("timestamp", now))))
        except (ValueError, TypeError, OverflowError, OSError) as exc:
            bad(_raw(row), f"ts: {exc}")
            continue
        dev = row.get("device") or device
        row_tags = {
            k: str(v)
            for k, v in row.items()
            if k not in _RESERVED and isinstance(v, str) and k in tags
        }
        base = {"ts": ts, "device": str(dev), "source": source, **tags, **row_tags}
        if "metric" in row:
            try:
                metric = _metric_name(row["metric"])
                value = _as_float(row.get("value"))
            except RejectedValue as exc:
                bad(_raw(row), f"{exc}")
                continue
            unit = row.get("unit", units.get(metric))
            out.append(
                {
                    **base,
                    "metric": metric,
                    "value": value,
                    "unit": None if unit is None else str(unit),
                }
            )
            continue
        for key, value in row.items():
            if key in _RESERVED or key in tags or isinstance(value, str):
                continue
            try:
                number = _as_float(value)
            except RejectedValue as exc:
                bad(_raw(row), f"{key}: {exc}")
                continue
            out.append({**base, "metric": str(key), "value": number, "unit": units.get(key)})
    if not out:
        return empty_readings(tags)
    return pl.DataFrame(out, schema=empty_readings(tags).schema)


def normalize(
    data: Any,
    *,
    device: str,
    source: str,
    now: datetime,
    units: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    reject: Reject | None = None,
) -> pl.DataFrame:
    """Whatever a source returned (rows, a dict, a Polars/Arrow table) as a canonical frame.

    ``reject`` (the source's ``ctx.reject``) receives each bad row or value with its reason
    while the good ones go on; without it a bad one raises RejectedValue (the whole tick).
    """
    kw: dict[str, Any] = {
        "device": device,
        "source": source,
        "now": now,
        "units": units,
        "tags": tags,
        "reject": reject,
    }
    if data is None:
        return rows_to_frame([], **kw)
    if hasattr(data, "__arrow_c_stream__") and not isinstance(data, pl.DataFrame):
        data = pl.DataFrame(data)  # an Arrow table or batch (any library), without pyarrow
    if isinstance(data, pl.DataFrame):
        if "metric" not in data.columns:
            return rows_to_frame(data.to_dicts(), **kw)
        return conform(data, **kw)
    if isinstance(data, Mapping):
        data = [data]
    elif isinstance(data, str | bytes) or not isinstance(data, Iterable):
        _rejecter(reject)(_raw(data), f"a {type(data).__name__} is not a reading (a dict)")
        return rows_to_frame([], **kw)
    return rows_to_frame(data, **kw)


_NESTED = (pl.List, pl.Array, pl.Struct, pl.Object)


def _ts_expr(dtype: pl.DataType, now: datetime) -> pl.Expr:
    """The `ts` column as UTC microseconds; null where a value cannot be read."""
    ts = pl.col("ts")
    if dtype == pl.String:
        ts = ts.str.strip_chars().str.to_datetime(time_unit="us", time_zone="UTC", strict=False)
    elif dtype == pl.Date:
        ts = ts.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    elif isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            ts = ts.dt.replace_time_zone("UTC")
    elif dtype.is_numeric():  # epoch seconds, as ``to_utc`` reads numbers
        micros = (ts.cast(pl.Float64) * 1e6).round().cast(pl.Int64, strict=False)
        ts = pl.from_epoch(micros, time_unit="us").dt.replace_time_zone("UTC")
    elif dtype == pl.Null:
        ts = pl.lit(None, POLARS_SCHEMA["ts"])
    else:
        raise TypeError(f"cannot read times from a {dtype} column")
    return ts.dt.convert_time_zone("UTC").dt.cast_time_unit("us")


def _value_expr(dtype: pl.DataType) -> tuple[pl.Expr, pl.Expr]:
    """(value as Float64 with NaN as null, bad-cell flag) of the `value` column."""
    col = pl.col("value")
    if dtype == pl.String:
        text = col.str.strip_chars()
        value = text.cast(pl.Float64, strict=False)
        empty = text.is_null() | text.str.to_lowercase().is_in(list(MISSING_TEXT))
    elif isinstance(dtype, _NESTED):
        return pl.lit(None, pl.Float64), col.is_not_null()
    else:
        value = col.cast(pl.Float64, strict=False)
        empty = col.is_null()
    bad = ~empty & (value.is_null() | value.is_infinite())
    return pl.when(bad).then(None).otherwise(value).fill_nan(None), bad


def _frame_reason(row: Mapping[str, Any], flags: Mapping[str, bool]) -> str:
    if flags["__bad_ts"]:
        return f"ts: cannot read a time from {row.get('ts')!r:.60}"
    if flags["__bad_metric"]:
        return "no metric name"
    try:
        _as_float(row.get("value"))
    except RejectedValue as exc:
        return str(exc)
    return f"{row.get('value')!r:.60} is not a number"


def _canonical(df: pl.DataFrame, tags: Mapping[str, str], units: Mapping[str, str] | None) -> bool:
    """Whether ``conform`` would hand ``df`` back as it is (a replay's chunks, a source that
    builds canonical frames itself), so the cast-and-check pass can be skipped.

    Exactly the canonical columns, in order and with their types, then the tags as strings; no
    null to fill (ts, device, source, metric, tags; unit when `units:` could fill it) and
    nothing to reject or clean (an empty metric, an infinite or NaN value). Null counts are
    kept by Polars; the rest is two reductions, cheaper than conform's own select: a finite sum
    proves every value finite (NaN and infinities propagate in any order of summation; a sum
    that overflows only sends the frame through conform).
    """
    expected = [*POLARS_SCHEMA.items(), *((tag, pl.String()) for tag in tags)]
    if list(df.schema.items()) != expected:
        return False
    if df.height == 0:
        return True
    for name in ("ts", "device", "source", "metric", *tags):
        if df.get_column(name).null_count():
            return False
    if units and df.get_column("unit").null_count():
        return False
    if not math.isfinite(df.get_column("value").sum()):
        return False
    return bool(df.get_column("metric").str.len_bytes().min())


def conform(
    df: pl.DataFrame,
    *,
    device: str,
    source: str,
    now: datetime,
    units: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    reject: Reject | None = None,
) -> pl.DataFrame:
    """A narrow frame with missing canonical columns filled and types cast (vectorised).

    Casts are per cell (``strict=False``): a row whose ts, metric or value cannot be read is
    handed to ``reject`` (or raises RejectedValue without it) and the rest of the frame goes
    on. A column no cast can read at all (objects, nested types in device/unit/tags) sends
    the frame through the per-row path, which isolates the bad rows the same way.
    """
    tags = dict(tags or {})
    if _canonical(df, tags, units):
        return df
    schema = df.schema
    cols: list[pl.Expr] = []
    checks: list[pl.Expr] = []
    try:
        if "ts" in df.columns:
            ts = _ts_expr(schema["ts"], now)
            cols.append(ts.alias("ts"))
            checks.append(ts.is_null().alias("__bad_ts"))
        else:
            cols.append(pl.lit(now).cast(POLARS_SCHEMA["ts"]).alias("ts"))
            checks.append(pl.lit(False).alias("__bad_ts"))
        for name, default in (("device", device), ("source", source)):
            cols.append(
                (
                    pl.col(name).cast(pl.String).fill_null(default)
                    if name in df.columns
                    else pl.lit(default)
                ).alias(name)
            )
        metric = pl.col("metric").cast(pl.String)
        cols.append(metric)
        checks.append((metric.is_null() | (metric == "")).alias("__bad_metric"))
        if "value" in df.columns:
            value, bad_value = _value_expr(schema["value"])
        else:
            value, bad_value = pl.lit(None, pl.Float64), pl.lit(False)
        cols.append(value.alias("value"))
        checks.append(bad_value.alias("__bad_value"))
        unit_map = pl.col("metric").replace_strict(
            dict(units or {}), default=None, return_dtype=pl.String
        )
        cols.append(
            (
                pl.col("unit").cast(pl.String).fill_null(unit_map)
                if "unit" in df.columns
                else unit_map
            ).alias("unit")
        )
        for tag, default in tags.items():
            cols.append(
                (
                    pl.col(tag).cast(pl.String).fill_null(default)
                    if tag in df.columns
                    else pl.lit(default, pl.String)
                ).alias(tag)
            )
        out = df.select(*cols, *checks)
    except (pl.exceptions.PolarsError, TypeError):
        rows = df.to_dicts()
        return rows_to_frame(
            rows, device=device, source=source, now=now, units=units, tags=tags, reject=reject
        )
    flags = ["__bad_ts", "__bad_metric", "__bad_value"]
    bad = out.select(pl.any_horizontal(flags)).to_series()
    if bad.any():
        report = _rejecter(reject)
        marks = out.filter(bad).select(flags).to_dicts()
        for row, mark in zip(df.filter(bad).to_dicts(), marks, strict=True):
            report(_raw(row), _frame_reason(row, mark))
        out = out.filter(~bad)
    return out.drop(flags)

