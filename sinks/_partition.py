"""Hive partition paths from event time, shared by the local lake and the S3 lake.

Every partition value becomes one path segment through :func:`sanitize`:

- characters outside ``[A-Za-z0-9_.-]`` are percent-encoded (UTF-8 bytes), so a device id like
  ``../x`` can never leave the root and every reader sees a plain Hive ``key=value`` folder;
- a value whose encoded form would pass :data:`MAX_SEGMENT_BYTES` (120) becomes a readable
  prefix of the encoding plus ``~`` and 10 hex digits of the SHA-256 of the *full* value.

Why the bound: a file system refuses a name over 255 bytes (``ENAMETOOLONG``) and S3 a key over
1,024 bytes, and no retry can fix either. Thirty CJK characters are 270 bytes once
percent-encoded, so without a bound one odd metric name would block its sink for good. ``~`` is
never produced by the encoding, so a shortened value cannot equal a short one, and the hash of
the whole value keeps two long values with the same prefix apart. The full value always stays in
the file's own column: readers that trust the file (``collector export``, Polars, DuckDB) see it
unchanged; only the folder name is shortened.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from datetime import date

import polars as pl

TIME_PARTS = {
    "date": "%Y-%m-%d",
    "year": "%Y",
    "month": "%m",
    "day": "%d",
    "hour": "%H",
}
DEFAULT_PARTITIONS = ("metric", "date")
MAX_SEGMENT_BYTES = 120
"""Longest encoded partition value or batch-id segment: with a key name and ``=`` a folder stays
far below a file name's 255 bytes, and a few of them plus a file name far below S3's 1,024."""
HASH_MARK = "~"
HASH_HEX = 10
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_CUT_ESCAPE = re.compile(r"%[0-9A-F]?$")


def _encode(text: str) -> str:
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), text)


def bound(encoded: str, original: str, limit: int = MAX_SEGMENT_BYTES) -> str:
    """``encoded`` itself if it fits ``limit`` bytes, else its prefix + ``~`` + a short hash.

    The prefix is cut so no ``%XX`` escape is split; the hash is of ``original`` (the value
    before encoding), so the shortened name is the same on every retry and every device.
    """
    if len(encoded) <= limit:
        return encoded
    digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_HEX]
    head = _CUT_ESCAPE.sub("", encoded[: limit - len(HASH_MARK) - HASH_HEX])
    return f"{head}{HASH_MARK}{digest}"


def sanitize(value: object) -> str:
    """A value safe as one path segment: percent-encoded, never dot-only, at most 120 bytes."""
    if value is None:
        return "__HIVE_DEFAULT_PARTITION__"
    original = str(value)
    text = _encode(original)
    if text.strip(".") == "":
        text = text.replace(".", "%2E")
    return bound(text, original) or "__empty__"


def part_name(batch_id: str) -> str:
    """``part-<batch id>.parquet``, the batch id encoded and bounded like a partition value.

    Batch ids are at most ~80 bytes (see ``collector.runtime.identity``); the bound only matters
    for ids of another shape, which must still make a valid file name and object key.
    """
    return f"part-{sanitize(batch_id)}.parquet"


def bound_id(text: str, limit: int) -> str:
    """``text`` if it fits ``limit`` UTF-8 bytes, else a prefix + ``~`` + 16 hex of its SHA-256.

    For ids a service caps (IoT Analytics ``messageId`` 128 characters, ES ``_id`` 512 bytes):
    today's record ids are ~90 bytes and pass unchanged; a longer one still gets an id that is
    the same on every retry (so replays still overwrite) and distinct from every other id.
    """
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[: limit - 1 - len(digest)].decode("utf-8", "ignore")
    return f"{head}{HASH_MARK}{digest}"


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


def split(frame: pl.DataFrame, parts: Sequence[str]) -> Iterator[tuple[str, pl.DataFrame]]:
    """(relative folder like ``metric=temperature/date=2024-01-01``, rows) for each partition.

    Partition columns stay in the file as well as in the path, so a file read alone is complete.
    """
    for folder, rows, _ in split_indexed(frame, parts):
        yield folder, rows


def split_indexed(
    frame: pl.DataFrame, parts: Sequence[str]
) -> Iterator[tuple[str, pl.DataFrame, pl.Series]]:
    """Like :func:`split`, plus the partition's row numbers in ``frame``.

    Sinks hand those rows back to the runtime (``sinks._isolate.Outcome``) when one partition
    fails, so only that partition is re-spooled or dead-lettered. Time parts are grouped on
    their numbers (a date, an hour) and formatted once per partition, not once per row; a
    batch of one partition (the common case: one metric, one day) is handed on whole.
    """
    keys = [f"__part_{p}" for p in parts]
    exprs = [
        _TIME_EXPRS[p].alias(k) if p in TIME_PARTS else pl.col(p).cast(pl.String).alias(k)
        for p, k in zip(parts, keys, strict=True)
    ]
    values = frame.select(exprs)
    if all(values.get_column(k).n_unique() == 1 for k in keys):
        yield _folder(parts, values.row(0)), frame, pl.int_range(frame.height, eager=True)
        return
    index = "__part_row"
    df = pl.concat([frame, values], how="horizontal").with_row_index(index)
    for group_key, group in df.partition_by(keys, as_dict=True, maintain_order=True).items():
        yield (
            _folder(parts, group_key),
            group.drop([*keys, index]),
            group.get_column(index).cast(pl.Int64),
        )


_TIME_EXPRS: dict[str, pl.Expr] = {
    "date": pl.col("ts").dt.date(),
    "year": pl.col("ts").dt.year(),
    "month": pl.col("ts").dt.month(),
    "day": pl.col("ts").dt.day(),
    "hour": pl.col("ts").dt.hour(),
}
"""Each time part as a number (or date) to group on; ``_text`` formats it like ``TIME_PARTS``."""


def _text(part: str, value: object) -> object:
    if value is None or part not in TIME_PARTS:
        return value
    if isinstance(value, date):
        return value.strftime(TIME_PARTS[part])
    return f"{value:04d}" if part == "year" else f"{value:02d}"


def _folder(parts: Sequence[str], values: Sequence[object]) -> str:
    return "/".join(f"{p}={sanitize(_text(p, v))}" for p, v in zip(parts, values, strict=True))
