"""Hive partition paths from event time, shared by the local lake and the S3 lake.

Partition values are sanitised so that a device id like ``../x`` can never leave the root.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import polars as pl
import pyarrow as pa

TIME_PARTS = {
    "date": "%Y-%m-%d",
    "year": "%Y",
    "month": "%m",
    "day": "%d",
    "hour": "%H",
}
DEFAULT_PARTITIONS = ("metric", "date")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def sanitize(value: object) -> str:
    """A value safe as one path segment: unsafe characters percent-encoded, no dot-only names."""
    if value is None:
        return "__HIVE_DEFAULT_PARTITION__"
    text = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), str(value))
    if text.strip(".") == "":
        text = text.replace(".", "%2E")
    return text or "__empty__"


def validate_partitions(parts: Sequence[str], columns: Sequence[str] | None = None) -> None:
    """ValueError for a partition key that is neither a time part nor (if known) a column."""
    for p in parts:
        if p in TIME_PARTS:
            continue
        if columns is not None and p not in columns:
            raise ValueError(
                f"partition key {p!r} is neither a time part ({', '.join(TIME_PARTS)}) "
                f"nor a column ({', '.join(columns)})"
            )


def split(table: pa.Table, parts: Sequence[str]) -> Iterator[tuple[str, pa.Table]]:
    """(relative folder like ``metric=temperature/date=2024-01-01``, rows) for each partition.

    Partition columns stay in the file as well as in the path, so a file read alone is complete.
    """
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    keys: list[str] = []
    exprs: list[pl.Expr] = []
    for p in parts:
        key = f"__part_{p}"
        keys.append(key)
        if p in TIME_PARTS:
            exprs.append(pl.col("ts").dt.strftime(TIME_PARTS[p]).alias(key))
        else:
            exprs.append(pl.col(p).cast(pl.String).alias(key))
    df = df.with_columns(exprs)
    for group_key, group in df.group_by(keys, maintain_order=True):
        folder = "/".join(
            f"{p}={sanitize(v)}" for p, v in zip(parts, group_key, strict=True)
        )
        yield folder, group.drop(keys).to_arrow()
