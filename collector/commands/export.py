"""The one query path over a Parquet lake: ``collector export`` and the dashboard both use it.

The lake is Hive-partitioned (``<root>/metric=<m>/date=<YYYY-MM-DD>/part-<batch>.parquet`` by
default, any ``key=value`` levels work). Partition pruning is done here, on the listing, before
Polars sees a path: a directory whose partition cannot match the query is never listed, so a
1-day query on a 30-day lake opens 1/30 of the files on local disk and on S3 alike, and the files
a query reads are a plain list a test can check.

Files of different shapes (raw readings with ``value``; window aggregates with ``mean``/``min``/
``max``/``count``; extra tag columns) are scanned in groups of identical schema and concatenated
with missing columns as nulls, so one metric written raw and another aggregated read as one
frame.

Window output carries a ``partial`` column: a stop emits still-open windows as partial rows and
the restarted collector later writes the complete row of the same window. Readers show one row
per window (:func:`supersede_partials`) unless asked for everything (``keep_partial``).

``where`` goes through :mod:`collector.sqlexpr` (the one SQL gate), checked against the
columns of the rows at hand before anything is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from collector.schema import POLARS_SCHEMA
from collector.sqlexpr import check_on, compile_expr, safe_reason
from sinks._partition import sanitize

_TIME_KEYS = ("date", "year", "month", "day", "hour")
_HIDDEN = (".", "_")


# ---------------------------------------------------------------------------------------------
# time arguments


_RELATIVE_RE = re.compile(r"^([+-])\s*((?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w)\s*)+)$")
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A UTC datetime from ``--since``/``--until`` text.

    Accepts ``now``, ``today`` (midnight UTC), ``yesterday``, a relative offset from ``now``
    (``-1d``, ``-2h30m``, ``+15m``), an ISO date (``2024-06-01`` = midnight UTC) or an ISO
    date-time (``2024-06-01T12:00``, ``…Z`` or with an offset; naive means UTC).
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    raw = text.strip()
    word = raw.lower()
    if word == "now":
        return now
    if word in ("today", "yesterday"):
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight if word == "today" else midnight - timedelta(days=1)
    m = _RELATIVE_RE.match(word)
    if m:
        seconds = sum(float(n) * _SECONDS[u] for n, u in _PART_RE.findall(m.group(2)))
        return now + timedelta(seconds=seconds if m.group(1) == "+" else -seconds)
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use now, today, yesterday, a relative offset like -1d or "
            "-2h30m, an ISO date like 2024-06-01 or an ISO time like 2024-06-01T12:00Z"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


# ---------------------------------------------------------------------------------------------
# the query


@dataclass(frozen=True)
class LakeQuery:
    """What to read. Hashable, so the dashboard can use it as a cache key.

    ``since`` is inclusive, ``until`` exclusive; both compare with ``ts`` (the window start for
    aggregates). ``where`` is a Polars SQL boolean expression applied to the rows.
    ``keep_partial`` shows every window row as written, partial ones included.
    """

    root: str
    since: datetime | None = None
    until: datetime | None = None
    devices: tuple[str, ...] | None = None
    metrics: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None
    where: str | None = None
    endpoint_url: str | None = None
    keep_partial: bool = False

    def __post_init__(self) -> None:
        for name in ("devices", "metrics", "sources"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                object.__setattr__(self, name, value.replace(tzinfo=UTC))
        if self.where:
            compile_expr(self.where)  # a typo fails before any file is listed


@dataclass(frozen=True)
class LakeFile:
    """One Parquet file of the lake with its partition values as written in the path."""

    path: str
    """Local path or ``s3://bucket/key``: what Polars is given."""
    partition: tuple[tuple[str, str], ...]
    size: int
    mtime_ns: int
    folder: str = field(default="")
    """Partition folder relative to the root, e.g. ``metric=temperature/date=2024-06-01``."""


def is_remote(root: str) -> bool:
    return root.startswith("s3://")


def storage_options(root: str, endpoint_url: str | None = None) -> dict[str, str] | None:
    """Polars cloud options for an S3 root; credentials come from the standard AWS chain."""
    if not is_remote(root):
        return None
    opts: dict[str, str] = {}
    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        opts["aws_endpoint_url"] = endpoint
        if endpoint.startswith("http://"):
            opts["aws_allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["aws_region"] = region
    return opts


def _filesystem(root: str, endpoint_url: str | None) -> tuple[pafs.FileSystem, str]:
    if not is_remote(root):
        return pafs.LocalFileSystem(), str(Path(root).resolve())
    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    kwargs: dict[str, Any] = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest.rstrip("/")
        kwargs["scheme"] = scheme or "https"
    return pafs.S3FileSystem(**kwargs), root.removeprefix("s3://").rstrip("/")


# ---------------------------------------------------------------------------------------------
# listing and partition pruning


def _time_range(values: dict[str, str]) -> tuple[datetime, datetime] | None:
    """The event-time interval a partition covers, from its date/year/month/day/hour values."""
    try:
        if "date" in values:
            d = date.fromisoformat(values["date"])
            start = datetime(d.year, d.month, d.day, tzinfo=UTC)
            span = timedelta(days=1)
        elif "year" in values:
            year = int(values["year"])
            if "month" not in values:
                return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
            month = int(values["month"])
            if "day" not in values:
                start = datetime(year, month, 1, tzinfo=UTC)
                end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
                return start, end
            start = datetime(year, month, int(values["day"]), tzinfo=UTC)
            span = timedelta(days=1)
        else:
            return None
        if "hour" in values:
            start += timedelta(hours=int(values["hour"]))
            span = timedelta(hours=1)
        return start, start + span
    except ValueError:
        return None


def _partition_matches(values: dict[str, str], query: LakeQuery) -> bool:
    """False only when the partition values prove no row can match (unknown keys never prune)."""
    for key, allowed in (
        ("metric", query.metrics),
        ("device", query.devices),
        ("source", query.sources),
    ):
        if (
            allowed is not None
            and key in values
            and values[key] not in {sanitize(a) for a in allowed}
        ):
            return False
    rng = _time_range(values)
    if rng is not None:
        start, end = rng
        if query.since is not None and end <= query.since:
            return False
        if query.until is not None and start >= query.until:
            return False
    return True


def list_files(query: LakeQuery) -> list[LakeFile]:
    """The Parquet files a query can need, pruning partitions level by level while listing.

    Sorted by partition folder then name, so batches come out oldest first within a partition.
    Hidden files (``.``/``_`` prefixes: temp files of a writer in progress) are skipped.
    """
    fs, base = _filesystem(query.root, query.endpoint_url)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"lake {query.root!r} does not exist")
    out: list[LakeFile] = []

    def walk(folder: str, rel: tuple[str, ...], values: dict[str, str]) -> None:
        for entry in sorted(fs.get_file_info(pafs.FileSelector(folder)), key=lambda e: e.path):
            name = entry.base_name
            if name.startswith(_HIDDEN):
                continue
            if entry.type == pafs.FileType.Directory:
                key, sep, value = name.partition("=")
                child = dict(values)
                if sep:
                    child[key] = value
                    if not _partition_matches(child, query):
                        continue
                walk(entry.path, (*rel, name), child)
            elif entry.type == pafs.FileType.File and name.endswith(".parquet"):
                path = f"s3://{entry.path}" if is_remote(query.root) else entry.path
                out.append(
                    LakeFile(
                        path=path,
                        partition=tuple(values.items()),
                        size=int(entry.size or 0),
                        mtime_ns=int(entry.mtime_ns or 0),
                        folder="/".join(rel),
                    )
                )

    walk(base, (), {})
    return out


def listing_key(files: Sequence[LakeFile]) -> tuple[tuple[str, int, int], ...]:
    """What changes when the lake changes: a cache key that invalidates on new batches."""
    return tuple((f.path, f.size, f.mtime_ns) for f in files)


# ---------------------------------------------------------------------------------------------
# scanning

_SCHEMAS: dict[tuple[str, int, int], pa.Schema] = {}


def _schema(file: LakeFile, fs: pafs.FileSystem) -> pa.Schema:
    """Footer schema, memoised by (path, size, mtime) since files are immutable once renamed."""
    key = (file.path, file.size, file.mtime_ns)
    schema = _SCHEMAS.get(key)
    if schema is None:
        path = file.path.removeprefix("s3://")
        schema = pq.read_schema(path, filesystem=fs)
        if len(_SCHEMAS) > 100_000:
            _SCHEMAS.clear()
        _SCHEMAS[key] = schema
    return schema


def row_filter(query: LakeQuery, columns: Iterable[str]) -> pl.Expr | None:
    cols = set(columns)
    preds: list[pl.Expr] = []
    if query.since is not None:
        preds.append(pl.col("ts") >= query.since)
    if query.until is not None:
        preds.append(pl.col("ts") < query.until)
    for name, allowed in (
        ("device", query.devices),
        ("metric", query.metrics),
        ("source", query.sources),
    ):
        if allowed is None:
            continue
        preds.append(pl.col(name).is_in(list(allowed)) if name in cols else pl.lit(False))
    if not preds:
        return None
    return pl.all_horizontal(preds)


def scan_files(files: Sequence[LakeFile], query: LakeQuery) -> pl.LazyFrame:
    """A lazy frame over ``files`` with the query's filters (not yet ``where``) pushed down."""
    fs, _ = _filesystem(query.root, query.endpoint_url)
    groups: dict[pa.Schema, list[str]] = {}
    for f in files:
        groups.setdefault(_schema(f, fs), []).append(f.path)
    opts = storage_options(query.root, query.endpoint_url)
    frames: list[pl.LazyFrame] = []
    for schema, paths in groups.items():
        lf = pl.scan_parquet(paths, hive_partitioning=False, storage_options=opts)
        pred = row_filter(query, schema.names)
        frames.append(lf if pred is None else lf.filter(pred))
    if not frames:
        return pl.LazyFrame(schema=POLARS_SCHEMA)
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")


def apply_where(lf: pl.LazyFrame, where: str | None) -> pl.LazyFrame:
    """Rows where the gated ``where`` holds; a column the rows lack is a ValueError here."""
    if not where:
        return lf
    return lf.filter(compile_expr(where, lf.collect_schema().names()).fill_null(False))


_INDEX = "__supersede_row"
_NOT_KEYS = frozenset({"record_id", "unit"})


def window_keys(schema: pl.Schema | dict[str, Any]) -> list[str]:
    """What identifies a window row: ``ts`` and every string column but record_id and unit
    (device, source, metric and tags; a complete row may bring a unit its partial lacked)."""
    return ["ts"] + [
        c for c, t in schema.items() if t == pl.String and c not in _NOT_KEYS and c != "ts"
    ]


def supersede_partials(lf: pl.LazyFrame) -> pl.LazyFrame:
    """One row per window: a complete row (``partial=false``) supersedes partial ones.

    For rows with the same :func:`window_keys`, partial rows are dropped when a complete row
    exists; otherwise the partial row with the largest ``count`` (if there is a ``count``) is
    kept, the last one written on a tie. Rows whose ``partial`` is null (raw readings mixed in
    the same frame) and frames without a ``partial`` column are returned untouched.
    """
    schema = lf.collect_schema()
    if "partial" not in schema or "ts" not in schema:
        return lf
    keys = window_keys(schema)
    partial = pl.col("partial").cast(pl.Boolean)
    is_partial = partial.fill_null(False)
    if "count" in schema and schema["count"].is_numeric():
        size = pl.col("count").cast(pl.Float64).fill_null(float("-inf"))
    else:
        size = pl.lit(0.0)
    best = pl.when(is_partial).then(size).max().over(keys)
    chosen = pl.when(is_partial & (size == best)).then(pl.col(_INDEX)).max().over(keys)
    complete = (~partial).fill_null(False).any().over(keys)
    keep = ~is_partial | (~complete & (pl.col(_INDEX) == chosen))
    return lf.with_row_index(_INDEX).filter(keep).drop(_INDEX)


def scan_lake(
    root: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    devices: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    where: str | None = None,
    endpoint_url: str | None = None,
) -> pl.LazyFrame:
    """The lake rows matching the arguments, as a lazy frame (partition-pruned, filters pushed)."""
    query = LakeQuery(
        root=root,
        since=since,
        until=until,
        devices=tuple(devices) if devices is not None else None,
        metrics=tuple(metrics) if metrics is not None else None,
        sources=tuple(sources) if sources is not None else None,
        where=where,
        endpoint_url=endpoint_url,
    )
    return scan(query)


def scan(query: LakeQuery, files: Sequence[LakeFile] | None = None) -> pl.LazyFrame:
    """``scan_lake`` for a ready :class:`LakeQuery` (and optionally an existing listing)."""
    files = list_files(query) if files is None else files
    lf = scan_files(files, query)
    if not query.keep_partial:
        lf = supersede_partials(lf)
    return apply_where(lf, query.where)


def lake_schema(query: LakeQuery, files: Sequence[LakeFile]) -> pl.Schema:
    """The columns of the query's result; with no file selected, those of the whole lake, so an
    empty export still has the lake's shape (an aggregate lake's mean/min/max/count)."""
    if files:
        return scan_files(files, query).collect_schema()
    everything = list_files(LakeQuery(root=query.root, endpoint_url=query.endpoint_url))
    if not everything:
        return pl.Schema(POLARS_SCHEMA)
    return scan_files(everything, LakeQuery(root=query.root, endpoint_url=query.endpoint_url))\
        .collect_schema()


# ---------------------------------------------------------------------------------------------
# export


def export(
    query: LakeQuery,
    out: Path,
    *,
    progress: bool = False,
    files: Sequence[LakeFile] | None = None,
    on_partition: Callable[[str, int], None] | None = None,
) -> int:
    """Write the query's rows to ``out`` (``.parquet`` zstd or ``.csv``); return the row count.

    Works partition by partition, so memory stays bounded by one partition and a progress bar
    (``progress=True``, rich, on stderr) moves as partitions are done. Every partition is cast
    to the schema of the whole result, so files of different shapes land in one table.
    """
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"{out}: the output must end in .parquet or .csv")
    files = list_files(query) if files is None else list(files)
    partitions: dict[str, list[LakeFile]] = {}
    for f in files:
        partitions.setdefault(f.folder, []).append(f)
    schema = lake_schema(query, files)
    where = None
    if query.where:  # unknown columns and type errors fail before anything is written
        where = compile_expr(query.where, schema.names())
        check_on(where, query.where, pl.DataFrame(schema=schema), boolean=True)
        where = where.fill_null(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = _Writer(tmp, suffix, schema)
    total = 0
    try:
        with _Progress(progress, len(partitions), sum(f.size for f in files)) as advance:
            for folder, part_files in partitions.items():
                frame = scan_files(part_files, query).collect()
                frame = frame.select(
                    [
                        pl.col(c).cast(t) if c in frame.columns else pl.lit(None, t).alias(c)
                        for c, t in schema.items()
                    ]
                )
                if not query.keep_partial:  # a window's rows share ts, so one partition
                    frame = supersede_partials(frame.lazy()).collect()
                if where is not None:
                    frame = frame.filter(where)
                if "ts" in frame.columns:
                    frame = frame.sort("ts", maintain_order=True)
                writer.write(frame)
                total += frame.height
                advance(sum(f.size for f in part_files))
                if on_partition is not None:
                    on_partition(folder, frame.height)
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return total


_CSV_TIME = "%Y-%m-%dT%H:%M:%S%.6fZ"
"""ISO 8601 in UTC (every lake timestamp is UTC), readable back by any CSV tool."""


class _Writer:
    """Appends frames of one schema to a Parquet or CSV file."""

    def __init__(self, path: Path, suffix: str, schema: pl.Schema) -> None:
        self.suffix = suffix
        self.path = path
        self._pq: pq.ParquetWriter | None = None
        self._csv = path.open("wb") if suffix == ".csv" else None
        self._header = True
        arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
        self._schema = arrow_schema
        if suffix == ".parquet":
            self._pq = pq.ParquetWriter(path, arrow_schema, compression="zstd")

    def write(self, frame: pl.DataFrame) -> None:
        if self._pq is not None:
            if frame.height:
                self._pq.write_table(frame.to_arrow().cast(self._schema))
        elif self._csv is not None and (frame.height or self._header):
            frame.write_csv(self._csv, include_header=self._header, datetime_format=_CSV_TIME)
            self._header = False

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
            self._pq = None
        if self._csv is not None:
            self._csv.close()
            self._csv = None


class _Progress:
    """A rich progress bar over bytes of input, or nothing when disabled or not a terminal."""

    def __init__(self, enabled: bool, partitions: int, total_bytes: int) -> None:
        self.enabled = enabled
        self.partitions = partitions
        self.total = total_bytes
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda _n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("export"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[parts]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task(
            "export", total=max(self.total, 1), parts=f"0/{self.partitions} partitions"
        )
        done = [0]

        def advance(n: int) -> None:
            done[0] += 1
            self._bar.update(self._task, advance=n, parts=f"{done[0]}/{self.partitions} partitions")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


class ExportFailed(click.ClickException):
    """One line for the user and an exit code: 2 for what they typed, 1 for I/O or no match.

    A ClickException, so the CLI prints ``Error: <message>`` and exits with ``exit_code``
    without a traceback, whichever of ValueError/OSError/PolarsError caused it.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_export(
    lake: str,
    out: Path,
    *,
    since: str | None = None,
    until: str | None = None,
    devices: Sequence[str] = (),
    metrics: Sequence[str] = (),
    sources: Sequence[str] = (),
    where: str | None = None,
    endpoint_url: str | None = None,
    progress: bool = True,
    now: datetime | None = None,
    keep_partial: bool = False,
) -> int:
    """``collector export`` in one call: CLI strings in, number of rows written out.

    Every failure is an :class:`ExportFailed`: exit 2 for a bad argument (a time, an unknown
    column or a type error in ``--where``, a refused SQL construct), 1 when the lake cannot be
    read, and 1 when a ``--device``/``--metric``/``--source`` names a value the lake does not
    hold (the empty file, with the lake's columns, is still written).
    """
    now = now or datetime.now(UTC)
    try:
        query = LakeQuery(
            root=lake,
            since=parse_time(since, now) if since else None,
            until=parse_time(until, now) if until else None,
            devices=tuple(devices) or None,
            metrics=tuple(metrics) or None,
            sources=tuple(sources) or None,
            where=where,
            endpoint_url=endpoint_url,
            keep_partial=keep_partial,
        )
        n = export(query, out, progress=progress)
        if n == 0:
            missing = _absent_values(query)
            if missing:
                raise ExportFailed(
                    f"0 rows -> {out}: " + "; ".join(missing), exit_code=1
                )
        return n
    except ExportFailed:
        raise
    except FileNotFoundError as exc:
        raise ExportFailed(safe_reason(exc), exit_code=1) from None
    except ValueError as exc:  # our own checks: the message names the argument
        raise ExportFailed(safe_reason(exc), exit_code=2) from None
    except (pl.exceptions.ColumnNotFoundError, pl.exceptions.InvalidOperationError,
            pl.exceptions.SchemaError, pl.exceptions.SQLInterfaceError,
            pl.exceptions.SQLSyntaxError) as exc:
        raise ExportFailed(f"--where: {safe_reason(exc)}", exit_code=2) from None
    except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as exc:
        raise ExportFailed(f"cannot read the lake {lake!r}: {safe_reason(exc)}", 1) from None


def _absent_values(query: LakeQuery, limit: int = 20) -> list[str]:
    """For each ``--device``/``--metric``/``--source`` filter, the asked values the lake does
    not hold at all (whatever the time range), with what it does hold: a typo says so, while a
    real name outside the time range is just an empty export."""
    base = LakeQuery(root=query.root, endpoint_url=query.endpoint_url)
    files = list_files(base)
    lf = scan_files(files, base)
    names = lf.collect_schema().names()
    out: list[str] = []
    for column, flag, asked in (
        ("device", "--device", query.devices),
        ("metric", "--metric", query.metrics),
        ("source", "--source", query.sources),
    ):
        if not asked:
            continue
        present: list[str] = []
        if column in names:
            present = sorted(
                v for v in lf.select(pl.col(column).unique()).collect().to_series().to_list()
                if v is not None
            )
        absent = [a for a in asked if a not in present]
        if absent:
            shown = ", ".join(present[:limit]) + (", …" if len(present) > limit else "")
            out.append(
                f"{flag} {', '.join(absent)} matches nothing in the lake"
                + (f" (it has: {shown})" if present else "")
            )
    return out
