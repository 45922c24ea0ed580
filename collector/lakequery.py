"""The read side of the lake, in one place: ``collector export`` and the dashboard both use it.

A *source* is a Parquet lake (a folder or ``s3://bucket/prefix``) or one sink's spool folder
(``<data_dir>/spool/<sink>``: rows not uploaded yet). Both are listed by :func:`list_files` and
read by :func:`scan_files`, so what the dashboard shows, what it offers for download and what
``collector export`` writes are the same rows, filtered and deduplicated by the same code.

**Lake.** Hive-partitioned (``<root>/metric=<m>/date=<YYYY-MM-DD>/part-<batch>.parquet`` by
default, any ``key=value`` levels work). Partition pruning is done here, on the listing, before
Polars sees a path: a directory whose partition cannot match the query is never listed, so a
1-day query on a 30-day lake opens 1/30 of the files on local disk and on S3 alike, and the files
a query reads are a plain list a test can check.

**Spool.** A local folder holding Arrow IPC stream files (``<batch id>.arrow``) and an
``inflight/`` folder (:func:`is_spool`) is read as a spool: the ready batches, then the ones a
sink worker is sending (a batch listed in both places during a move is read once). A file cut
short by a crash, or deleted under us once delivered, is skipped. ``dead-letter/`` is not read
(those rows will never be delivered).

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from collector.runtime import spool
from collector.schema import POLARS_SCHEMA
from collector.sqlexpr import compile_expr
from sinks._partition import sanitize

_HIDDEN = (".", "_")
SPOOL_SUFFIX = ".arrow"
INFLIGHT = "inflight"

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
    """The files a query can need: a lake's Parquet files, pruning partitions level by level
    while listing, or a spool's Arrow files (:func:`spool_files`) when ``root`` is a spool.

    Sorted by partition folder then name, so batches come out oldest first within a partition.
    Hidden files (``.``/``_`` prefixes: temp files of a writer in progress) are skipped.
    """
    if is_spool(query.root):
        return spool_files(Path(query.root))
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
    """A lazy frame over ``files`` (Parquet, or spooled Arrow) with the query's filters (not
    yet ``where``) pushed down."""
    spooled = [f for f in files if f.path.endswith(SPOOL_SUFFIX)]
    files = [f for f in files if not f.path.endswith(SPOOL_SUFFIX)]
    frames: list[pl.LazyFrame] = []
    if spooled:
        frame = read_spool([Path(f.path) for f in spooled])
        if frame is not None:
            lf = frame.lazy()
            pred = row_filter(query, frame.columns)
            frames.append(lf if pred is None else lf.filter(pred))
    fs, _ = _filesystem(query.root, query.endpoint_url) if files else (None, "")
    groups: dict[pa.Schema, list[str]] = {}
    for f in files:
        groups.setdefault(_schema(f, fs), []).append(f.path)  # type: ignore[arg-type]
    opts = storage_options(query.root, query.endpoint_url)
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
    # Partial rows are few (the windows open at a stop), so only they are grouped: window
    # expressions over every row's keys cost seconds on a month of a fleet's aggregates.
    lf = lf.with_row_index(_INDEX)
    settled = lf.filter(~is_partial)
    complete = settled.filter(partial.not_()).select(keys).unique()
    best = (
        lf.filter(is_partial)
        .join(complete, on=keys, how="anti", nulls_equal=True)
        .sort([size, pl.col(_INDEX)])
        .group_by(keys)
        .last()
    )
    return pl.concat([settled, best.select(settled.collect_schema().names())]).sort(_INDEX).drop(
        _INDEX
    )


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
    return scan_files(
        everything, LakeQuery(root=query.root, endpoint_url=query.endpoint_url)
    ).collect_schema()


# ---------------------------------------------------------------------------------------------
# the spool: Arrow IPC stream files not uploaded yet


def is_spool(root: str) -> bool:
    """True for a local folder laid out as one sink's spool: ``*.arrow`` files or an
    ``inflight/`` folder (a lake holds neither)."""
    if is_remote(root):
        return False
    folder = Path(root)
    if not folder.is_dir():
        return False
    if (folder / INFLIGHT).is_dir():
        return True
    return any(
        p.suffix == SPOOL_SUFFIX and not p.name.startswith(_HIDDEN) for p in folder.iterdir()
    )


def spool_roots(folder: Path) -> list[Path]:
    """The sink spools right under ``folder`` (``<data_dir>/spool``), to name when a user gives
    the parent folder instead of one sink's."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(_HIDDEN) and is_spool(str(p))
    )


def spool_files(folder: Path, *, inflight: bool = True) -> list[LakeFile]:
    """Spooled batches not yet delivered: ready files, then in-flight ones, each batch once.

    A batch moved from ready to ``inflight/`` while we list shows in both listings; it is
    kept once, at its ready path (:func:`read_spool` looks in the other place if it moved).
    A spool is not partitioned: every file is in folder ``""`` (one partition for export).
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"spool {str(folder)!r} does not exist")
    out: dict[str, LakeFile] = {}
    dirs = [folder, folder / INFLIGHT] if inflight else [folder]
    for place in dirs:
        try:
            entries = sorted(os.scandir(place), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith(_HIDDEN) or not name.endswith(SPOOL_SUFFIX) or name in out:
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # delivered and deleted while we list
                continue
            out[name] = LakeFile(
                path=entry.path, partition=(), size=st.st_size, mtime_ns=st.st_mtime_ns
            )
    return list(out.values())


def _spool_frame(path: Path) -> pl.DataFrame | None:
    """One spool file, or None when it is gone or cut short (being written, sent, deleted)."""
    others = [path]
    if path.parent.name == INFLIGHT:
        others.append(path.parent.parent / path.name)
    else:
        others.append(path.parent / INFLIGHT / path.name)
    for candidate in others:
        try:
            return spool.read_file(candidate)
        except FileNotFoundError:
            continue
        except spool.DAMAGED:
            return None
    return None


def read_spool(paths: Sequence[Path]) -> pl.DataFrame | None:
    """The rows of spool files as one frame (schemas unified, missing columns null), None
    when no file could be read."""
    frames = [f for f in (_spool_frame(Path(p)) for p in paths) if f is not None]
    if not frames:
        return None
    return pl.concat(frames, how="diagonal_relaxed")
