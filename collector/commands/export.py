"""``collector export``: the rows of a lake or a spool, filtered, to one Parquet or CSV file.

Reading (listing, partition pruning, the spool, one row per window, ``where``) is
:mod:`collector.lakequery`, shared with the dashboard; its names are re-exported here so older
imports (``from collector.commands.export import LakeQuery``) keep working. This module adds
the time arguments, the writer (partition by partition, bounded memory) and the CLI's errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from collector.lakequery import (
    LakeFile,
    LakeQuery,
    apply_where,
    is_remote,
    is_spool,
    lake_schema,
    list_files,
    listing_key,
    row_filter,
    scan,
    scan_files,
    scan_lake,
    spool_roots,
    storage_options,
    supersede_partials,
    window_keys,
)
from collector.sqlexpr import check_on, compile_expr, safe_reason

__all__ = [
    "ExportFailed",
    "LakeFile",
    "LakeQuery",
    "apply_where",
    "export",
    "is_remote",
    "is_spool",
    "lake_schema",
    "list_files",
    "listing_key",
    "parse_time",
    "row_filter",
    "run_export",
    "scan",
    "scan_files",
    "scan_lake",
    "storage_options",
    "supersede_partials",
    "window_keys",
]



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

    ``lake`` is a lake (folder or ``s3://``) or one sink's spool folder (detected: ``*.arrow``
    files or an ``inflight/`` folder), read by the same code (:mod:`collector.lakequery`).

    Every failure is an :class:`ExportFailed`: exit 2 for a bad argument (a time, an unknown
    column or a type error in ``--where``, a refused SQL construct), 1 when the lake cannot be
    read, and 1 when a ``--device``/``--metric``/``--source`` names a value the lake does not
    hold (the empty file, with the lake's columns, is still written).
    """
    now = now or datetime.now(UTC)
    if not is_remote(lake) and not is_spool(lake):
        sinks = spool_roots(Path(lake))
        if sinks:  # <data_dir>/spool: its dead-letter Parquet files are no lake
            raise ExportFailed(
                f"{lake} holds the spools of several sinks; export one of them: "
                + ", ".join(str(p) for p in sinks),
                exit_code=2,
            )
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
        what = "spool" if is_spool(lake) else "lake"
        raise ExportFailed(f"cannot read the {what} {lake!r}: {safe_reason(exc)}", 1) from None


def _absent_values(query: LakeQuery, limit: int = 20) -> list[str]:
    """For each ``--device``/``--metric``/``--source`` filter, the asked values the lake does
    not hold at all (whatever the time range), with what it does hold: a typo says so, while a
    real name outside the time range is just an empty export."""
    base = LakeQuery(root=query.root, endpoint_url=query.endpoint_url)
    where = "spool" if is_spool(query.root) else "lake"
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
                f"{flag} {', '.join(absent)} matches nothing in the {where}"
                + (f" (it has: {shown})" if present else "")
            )
    return out
