"""The canonical narrow reading schema and the conversions every plugin boundary uses.

One narrow schema (ts, device, source, metric, value, unit, tags) keeps filters, windows, the lake
and the dashboard generic: a new sensor is new rows, never new columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import polars as pl
import pyarrow as pa

TS_TYPE = pa.timestamp("us", tz="UTC")
READING_SCHEMA = pa.schema(
    [
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("unit", pa.string()),
    ]
)
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


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    f = float(value)
    return None if math.isnan(f) else f


def rows_to_frame(
    rows: Iterable[Mapping[str, Any]],
    *,
    device: str,
    source: str,
    now: datetime,
    units: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Narrow rows from either form a source may return.

    Narrow: ``{"metric": "temperature", "value": 21.5}``; wide: ``{"temperature": 21.5,
    "humidity": 40}`` (one row per numeric field). ``ts`` defaults to ``now``; ``device``,
    ``unit`` and tag keys given in a row win over the defaults.
    """
    units = units or {}
    tags = dict(tags or {})
    out: list[dict[str, Any]] = []
    for row in rows:
        ts = to_utc(row.get("ts", row.get("time", row.get("timestamp", now))))
        dev = str(row.get("device") or device)
        row_tags = {
            k: str(v)
            for k, v in row.items()
            if k not in _RESERVED and isinstance(v, str) and k in tags
        }
        base = {"ts": ts, "device": dev, "source": source, **tags, **row_tags}
        if "metric" in row:
            metric = str(row["metric"])
            out.append(
                {
                    **base,
                    "metric": metric,
                    "value": _as_float(row.get("value")),
                    "unit": row.get("unit", units.get(metric)),
                }
            )
            continue
        for key, value in row.items():
            if key in _RESERVED or key in tags or isinstance(value, str):
                continue
            if isinstance(value, Mapping | list):
                continue
            out.append({**base, "metric": key, "value": _as_float(value), "unit": units.get(key)})
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
) -> pl.DataFrame:
    """Whatever a source returned (rows, a dict, a Polars/Arrow table) as a canonical frame."""
    if data is None:
        return rows_to_frame([], device=device, source=source, now=now, tags=tags)
    if isinstance(data, pa.Table | pa.RecordBatch):
        data = pl.from_arrow(data)
    if isinstance(data, pl.DataFrame):
        if "metric" not in data.columns:
            return rows_to_frame(
                data.to_dicts(), device=device, source=source, now=now, units=units, tags=tags
            )
        return conform(data, device=device, source=source, now=now, units=units, tags=tags)
    if isinstance(data, Mapping):
        data = [data]
    return rows_to_frame(data, device=device, source=source, now=now, units=units, tags=tags)


def conform(
    df: pl.DataFrame,
    *,
    device: str,
    source: str,
    now: datetime,
    units: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """A narrow frame with missing canonical columns filled and types cast."""
    tags = dict(tags or {})
    cols: list[pl.Expr] = []
    if "ts" in df.columns:
        ts = pl.col("ts")
        if df.schema["ts"] == pl.String:
            ts = ts.str.to_datetime(time_zone="UTC")
        elif isinstance(df.schema["ts"], pl.Datetime) and df.schema["ts"].time_zone is None:  # type: ignore[union-attr]
            ts = ts.dt.replace_time_zone("UTC")
        cols.append(ts.dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias("ts"))
    else:
        cols.append(pl.lit(now).cast(POLARS_SCHEMA["ts"]).alias("ts"))
    for name, default in (("device", device), ("source", source)):
        cols.append(
            (
                pl.col(name).cast(pl.String).fill_null(default)
                if name in df.columns
                else pl.lit(default)
            ).alias(name)
        )
    cols.append(pl.col("metric").cast(pl.String))
    cols.append(
        (pl.col("value").cast(pl.Float64) if "value" in df.columns else pl.lit(None, pl.Float64))
        .fill_nan(None)
        .alias("value")
    )
    unit_map = pl.col("metric").replace_strict(
        dict(units or {}), default=None, return_dtype=pl.String
    )
    cols.append(
        (
            pl.col("unit").cast(pl.String).fill_null(unit_map) if "unit" in df.columns else unit_map
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
    return df.select(cols)
