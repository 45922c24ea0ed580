"""Replay a recorded CSV or Parquet file as if the sensors were live.

Rows keep their recorded event times; only the pace of delivery follows the wall clock (real
time, a speed factor, or as fast as possible). The file is scanned lazily and converted to the
canonical narrow schema batch by batch with vectorised Polars operations, so a 10M-row file
never passes through per-row Python.

Every chunk handed on covers a contiguous range of source rows, so the source's position (file
identity + rows consumed) after a chunk means "every row before this point is in this or an
earlier chunk, none after": a restart resumes after the last logged row, and a file that was
fully replayed is not replayed again. Cells that are not numbers go to the dead letter one by
one; the rest of their row and file go on (a bad cell never restarts the file).
"""

from __future__ import annotations

import asyncio
import bisect
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import Field, field_validator, model_validator

from collector.errors import ConfigError, ConfigIssue
from collector.plugin import Context, Source, SourceConfig
from collector.schema import MISSING_TEXT, POLARS_SCHEMA
from collector.units import TimeZone

_CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_TS = "__ts"
_ROW = "__row"
_BAD = "__bad"
_DEVICE = "__device"
_METRIC = "__metric"
_VALUE = "__value"
_MISSING_TEXT = list(MISSING_TEXT)
"""Cell texts that mean 'no reading' (compared lower-case): null values, never dead-lettered."""
_SAMPLE_ROWS = 10_000
"""Rows from the top of a file that decide which text columns are metrics (wide, no `columns`)."""
_ID_BYTES = 1024
"""Bytes hashed to recognise a file again (its head; for Parquet also its footer)."""

log = logging.getLogger("collector.sources.replay")


def resolve_format(path: str, fmt: str) -> Literal["csv", "parquet"]:
    """The file format, from ``format`` or else the file name's suffix."""
    if fmt in ("csv", "parquet"):
        return fmt  # type: ignore[return-value]
    lower = path.lower()
    if lower.endswith(_CSV_SUFFIXES):
        return "csv"
    if lower.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    raise ValueError(
        f"cannot tell the format of {path!r} from its name: set `format: csv` or `format: parquet`"
    )


class ReplayConfig(SourceConfig):
    """Config of the `replay` source."""

    type: Literal["replay"] = Field(default="replay", description="Plugin name.")
    path: str = Field(description="CSV or Parquet file to replay (a glob is accepted).")
    format: Literal["auto", "csv", "parquet"] = Field(
        default="auto", description="File format; `auto` decides from the file name."
    )
    time_column: str | list[str] = Field(
        default="ts",
        description="Column holding the event time, or several (e.g. `[Date, Time]`) joined "
        "with a space before parsing.",
    )
    time_format: str | None = Field(
        default=None,
        description="strftime format of the time text, e.g. `%d/%m/%Y %H:%M:%S`; default: "
        "ISO 8601 detection (numbers are epoch seconds).",
    )
    timezone: TimeZone = Field(
        default="UTC", description="IANA zone of times recorded without an offset."
    )
    layout: Literal["narrow", "wide"] = Field(
        default="narrow",
        description="`narrow`: `metric` and `value` columns; `wide`: every numeric column "
        "(except time and device) is a metric, text columns too when most of their cells in "
        "the first 10,000 rows are numbers.",
    )
    columns: list[str] | None = Field(
        default=None,
        description="wide: only these columns become metrics (always: a cell that is not a "
        "number goes to the dead letter, the rest of its row goes on).",
    )
    device_column: str | None = Field(
        default=None, description="Column with the device id (default: the runtime's device)."
    )
    missing_values: list[float] = Field(
        default_factory=list, description="Sentinel values that mean 'no reading', e.g. `[-200]`."
    )
    drop_missing: bool = Field(
        default=False, description="Drop rows whose value is missing instead of keeping nulls."
    )
    speed: float | Literal["max"] = Field(
        default=1.0,
        description="Pace: `1` real time, `10` ten times faster, `max` as fast as possible.",
    )
    chunk_rows: int = Field(
        default=200_000,
        gt=0,
        description="Largest number of narrow rows yielded at once (one log record each: "
        "larger chunks cost fewer per-batch steps, smaller ones less memory).",
    )
    separator: str = Field(
        default=",", min_length=1, max_length=1, description="CSV field separator."
    )
    decimal_comma: bool = Field(
        default=False, description="CSV numbers use a decimal comma (`2,6`)."
    )
    restart: bool = Field(
        default=False,
        description="Replay the file from the top on every start, instead of continuing after "
        "the last logged row (and skipping a file that was fully replayed).",
    )

    @field_validator("speed")
    @classmethod
    def _positive_speed(cls, value: float | str) -> float | str:
        if value != "max" and float(value) <= 0:
            raise ValueError("speed must be above 0, or `max`")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ReplayConfig:
        resolve_format(self.path, self.format)
        if self.columns is not None and self.layout != "wide":
            raise ValueError("`columns` applies to `layout: wide` only")
        if isinstance(self.time_column, list) and not self.time_column:
            raise ValueError("`time_column` needs at least one column")
        return self

    @property
    def time_columns(self) -> list[str]:
        return [self.time_column] if isinstance(self.time_column, str) else list(self.time_column)


class Pacer:
    """When each row is due: event time offset from the first row, divided by the speed."""

    def __init__(self, speed: float, clock: Callable[[], float]) -> None:
        self.speed = speed
        self.clock = clock
        self.t0: int | None = None
        self.w0 = 0.0

    def limit(self, first_us: int) -> int:
        """Latest event time (µs) that is due now; starts the clock at the first row."""
        now = self.clock()
        if self.t0 is None:
            self.t0, self.w0 = first_us, now
        return self.t0 + round((now - self.w0) * self.speed * 1e6)

    def delay(self, ts_us: int) -> float:
        """Seconds from now until a row with event time ``ts_us`` is due."""
        assert self.t0 is not None
        return self.w0 + (ts_us - self.t0) / 1e6 / self.speed - self.clock()


def _number(column: str, dtype: pl.DataType, decimal_comma: bool, careful: bool) -> pl.Expr:
    """``column`` cast to Float64 cell by cell (null where a cell does not read as a number)."""
    col = pl.col(column)
    if dtype != pl.String:
        return col.cast(pl.Float64, strict=False)
    text = col.str.strip_chars() if careful else col
    if decimal_comma:
        text = text.str.replace_all(",", ".", literal=True)
    return text.cast(pl.Float64, strict=False)


def _numbers(
    batch: pl.DataFrame,
    columns: list[str],
    dtypes: dict[str, pl.DataType],
    decimal_comma: bool,
    cast: dict[str, str] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``batch`` with ``columns`` as Float64, and its bad cells (`__row`, `metric`, `__bad`).

    A cell is bad when it holds something (not empty, not a missing-value marker such as `NA`)
    that is not a finite number: its value becomes null and its text is kept for the dead
    letter, so the caller can reject exactly that cell and keep the rest of the row. Cheap in
    the common case: one cast per column (``cast`` names columns of ``batch`` that already
    hold it, done by the scan); only a column with a suspicious cell (text that did not cast,
    or ±inf) gets the careful pass (stripping blanks, missing-value markers).
    """
    cast = cast or {}

    def number(column: str, careful: bool) -> pl.Expr:
        return _number(column, dtypes[column], decimal_comma, careful)

    quick = batch.select(
        [
            pl.col(cast[c]).alias(c) if c in cast else number(c, careful=False).alias(c)
            for c in columns
        ]
    )
    # Null counts are kept with each column: comparing them costs nothing per cell.
    flags = [
        quick[c].null_count() > batch[c].null_count() or bool(quick[c].is_infinite().any())
        for c in columns
    ]
    good = [quick[c] for c, bad in zip(columns, flags, strict=True) if not bad]
    careful: list[pl.Expr] = []
    bad_cells: list[pl.DataFrame] = []
    for column in (c for c, bad in zip(columns, flags, strict=True) if bad):
        col, value = pl.col(column), number(column, careful=True)
        if dtypes[column] == pl.String:
            text = col.str.strip_chars()
            empty = text.is_null() | text.str.to_lowercase().is_in(_MISSING_TEXT)
            shown = col
        else:
            empty, shown = col.is_null(), col.cast(pl.String, strict=False).fill_null("?")
        bad = ~empty & (value.is_null() | value.is_infinite())
        bad_cells.append(
            batch.filter(bad).select(
                _ROW, pl.lit(column, pl.String).alias("metric"), shown.alias(_BAD)
            )
        )
        careful.append(pl.when(bad).then(None).otherwise(value).alias(column))
    bad_frame = (
        pl.concat(bad_cells)
        if bad_cells
        else pl.DataFrame(schema={_ROW: pl.UInt32, "metric": pl.String, _BAD: pl.String})
    )
    return batch.with_columns(good + careful), bad_frame


def _bad_reason(what: str, text: str) -> str:
    try:
        infinite = float(text.replace(",", ".")) in (float("inf"), float("-inf"))
    except ValueError:
        infinite = False
    return f"{what}: {text[:80]!r} is {'not finite' if infinite else 'not a number'}"


_PARQUET_READ_CHUNKS = 5
"""Chunks read from a Parquet file at once: few enough reads to decode at full speed (1 M
rows at the default chunk, 0.2 s for 10 M narrow rows), few enough rows to hold."""


def _on_demand(lf: pl.LazyFrame, per: int, step: int) -> Iterator[pl.DataFrame]:
    """Chunks of ``per`` rows of a Parquet scan, ``step`` rows read when the last are used up.

    Polars' batch iterator keeps decoding ahead of a slower consumer (the pipeline), so a replay
    of 10 M rows held 400 MB of read-ahead; a Parquet slice reads only the row groups it
    covers, so reading on demand holds at most one step.
    """
    offset = 0
    while True:
        try:
            part = lf.slice(offset, step).collect()
        except (pl.exceptions.PolarsError, OSError):
            # Damage somewhere in this step: read it a chunk at a time, so the rows before the
            # damaged row group are still handed on and the error comes where the damage is.
            for lo in range(offset, offset + step, per):
                chunk = lf.slice(lo, per).collect()
                yield chunk
                if chunk.height < per:
                    return
            offset += step
            continue
        for lo in range(0, part.height, per):
            yield part.slice(lo, per)
        if part.height < step:
            return
        offset += step


@dataclass
class _FilePlan:
    """How one file of the replay is read: its scan (with `__ts`), metric columns, identity."""

    file: str
    lf: pl.LazyFrame
    metrics: list[str]
    dtypes: dict[str, pl.DataType]
    identity: dict[str, Any]
    casts: dict[str, str]
    """Text column → a column of the scan holding its quick Float64 cast (made while reading,
    in Polars' own threads, instead of in the source's thread)."""


def file_identity(file: str, fmt: str, head_bytes: int | None = None) -> dict[str, Any]:
    """What recognises a file again after a restart: a hash of its head, its size.

    ``head_bytes`` hashes as many bytes as a logged identity did, so a small CSV that only grew
    (rows appended) still matches. Parquet adds its footer (rewritten whenever its data is).
    """
    size = os.path.getsize(file)
    n = min(_ID_BYTES, size) if head_bytes is None else head_bytes
    digest = hashlib.blake2b(digest_size=16)
    with open(file, "rb") as fh:
        digest.update(fh.read(n))
        if fmt == "parquet":
            fh.seek(max(0, size - _ID_BYTES))
            digest.update(fh.read())
    return {"fingerprint": digest.hexdigest(), "head_bytes": n, "size": size}


class ReplaySource(Source):
    """Replays a recorded CSV/Parquet file at real time, a speed factor, or as fast as possible.

    The position handed to the runtime is ``{"path", "file", "fingerprint", "head_bytes",
    "size", "rows", "done"}``: the config's path (glob), the absolute file, its identity, the
    source rows of that file consumed so far and whether that was all of them. Files of a glob
    are replayed in name order, so files that sort before the logged one count as done.
    """

    Config = ReplayConfig
    description = "Replay a recorded CSV or Parquet file at real time, a speed factor or max."
    example = """\
- name: air
  type: replay
  path: ./AirQualityUCI.csv           # as in UCI's AirQualityUCI.zip
  separator: ";"
  decimal_comma: true                 # 2,6 is 2.6
  time_column: [Date, Time]           # 10/03/2004 and 18.00.00
  time_format: "%d/%m/%Y %H.%M.%S"
  layout: wide
  missing_values: [-200]
  drop_missing: true
  speed: max
"""
    requires = {}
    long_lived = True
    finite = True

    def __init__(self, config: ReplayConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        # Injectable so tests can check pacing without waiting (and without timing asserts).
        self.clock: Callable[[], float] = time.monotonic
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._format = resolve_format(config.path, config.format)
        self._resume_from: dict[str, Any] | None = None
        self._files: list[str] | None = None
        self._cursor: tuple[int, int] = (0, 0)
        """(file index, rows of it consumed): where the next stream() call continues."""
        self._handed: dict[str, Any] | None = None
        self._plan_cache: _FilePlan | None = None
        self._chunk: dict[str, Any] | None = None
        """Reference of the chunk handed on last: its file, identity and source-row range."""
        self._reread_plans: dict[str, _FilePlan] = {}
        """Plans of the pipeline thread's rereads (apart from the stream's own)."""

    # -- position ----------------------------------------------------------------------------

    def position(self) -> dict[str, Any] | None:
        return None if self._handed is None else dict(self._handed)

    def resume(self, position: dict[str, Any]) -> None:
        # Only remembered here: the files are looked at in open(), where I/O belongs.
        self._resume_from = dict(position) if position else None

    def reference(self) -> dict[str, Any] | None:
        return self._chunk

    def reread(self, reference: dict[str, Any]) -> pl.DataFrame:
        """Source rows ``[lo, hi)`` of the file, narrowed as when they were handed on (their
        bad cells were dead-lettered then and are not again)."""
        file, lo, hi = str(reference["file"]), int(reference["lo"]), int(reference["hi"])
        now = file_identity(file, self._format, int(reference["head_bytes"]))
        logged = int(reference["size"])
        same_size = now["size"] == logged or (self._format == "csv" and now["size"] > logged)
        if now["fingerprint"] != reference["fingerprint"] or not same_size:
            raise ValueError(f"{file} changed since its rows {lo}-{hi} were logged")
        plan = self._reread_plans.get(file)
        if plan is None:
            plan = self._reread_plans[file] = self._plan(file)
            if len(self._reread_plans) > 4:  # bounded: a glob of many files
                del self._reread_plans[next(iter(self._reread_plans))]
        batch = plan.lf.slice(lo, hi - lo).collect()
        narrow, _rejects = self._narrow(batch, plan)
        return self._finish(narrow)

    def _hand(self, plan: _FilePlan, index: int, rows: int, done: bool, lo: int) -> None:
        """Record that rows ``[0, rows)`` of file ``index`` are handed on (the next yield),
        the chunk being rows ``[lo, rows)``."""
        self._chunk = {"file": plan.file, **plan.identity, "lo": lo, "hi": rows}
        self._handed = {
            "path": self.config.path,
            "file": plan.file,
            **plan.identity,
            "rows": rows,
            "done": done,
        }
        self._cursor = (index + 1, 0) if done else (index, rows)

    def _list_files(self) -> list[str]:
        cfg = self.config
        pattern = os.path.expanduser(cfg.path)
        if not glob.has_magic(pattern):
            if not Path(pattern).exists():
                raise ConfigError(
                    [
                        ConfigIssue(
                            path="path", message=f"{self.ctx.component}: no file {cfg.path!r}"
                        )
                    ]
                )
            return [os.path.abspath(pattern)]
        files = sorted(os.path.abspath(f) for f in glob.glob(pattern, recursive=True))
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise ConfigError(
                [
                    ConfigIssue(
                        path="path", message=f"{self.ctx.component}: no file matches {cfg.path!r}"
                    )
                ]
            )
        return files

    def _start(self, files: list[str]) -> tuple[int, int]:
        """Where to begin given the logged position: (file index, rows to skip)."""
        cfg, name, pos = self.config, self.ctx.component, self._resume_from
        if pos is None:
            return 0, 0
        if cfg.restart:
            log.info("replay %s: `restart: true`, replaying %s from the top", name, cfg.path)
            return 0, 0
        if pos.get("path") != cfg.path or not isinstance(pos.get("file"), str):
            log.info(
                "replay %s: path is now %r (was %r): starting from the top",
                name,
                cfg.path,
                pos.get("path"),
            )
            return 0, 0
        file = pos["file"]
        if file not in files:
            index = sum(1 for f in files if f <= file)
            log.warning(
                "replay %s: %s, logged as replayed up to row %s, is gone; continuing "
                "with the files after it",
                name,
                file,
                pos.get("rows"),
            )
            return index, 0
        index = files.index(file)
        try:
            now = file_identity(file, self._format, int(pos.get("head_bytes", _ID_BYTES)))
        except OSError as exc:
            log.warning("replay %s: cannot read %s (%s): trying it from the top", name, file, exc)
            return index, 0
        size, rows = int(pos.get("size", -1)), int(pos.get("rows", 0))
        grown = self._format == "csv" and now["size"] > size
        if now["fingerprint"] != pos.get("fingerprint") or not (now["size"] == size or grown):
            log.warning(
                "replay %s: %s changed since it was replayed up to row %d (different "
                "content or size): replaying it from the top",
                name,
                file,
                rows,
            )
            return index, 0
        if pos.get("done") and not grown:
            if index + 1 >= len(files):
                log.info(
                    "replay %s: %s was fully replayed already (%d rows); nothing to do. "
                    "`collector run --from-start` or `restart: true` replays it",
                    name,
                    cfg.path,
                    rows,
                )
            return index + 1, 0
        if rows:
            log.info("replay %s: continuing %s after row %d", name, file, rows)
        return index, rows

    async def open(self) -> None:
        files = await asyncio.to_thread(self._list_files)
        self._files = files
        self._cursor = self._start(files)
        if self._resume_from is not None and not self.config.restart:
            self._handed = dict(self._resume_from)
        index = self._cursor[0]
        if index < len(files):
            # Columns and time format are checked here, where a failure stops this source (a
            # config error), rather than in stream(), which the runtime would restart.
            self._plan_cache = await asyncio.to_thread(self._plan, files[index])

    # -- building the scan -------------------------------------------------------------------

    def _scan(self, file: str) -> pl.LazyFrame:
        cfg = self.config
        if self._format == "parquet":
            return pl.scan_parquet(file, low_memory=True)
        # Every CSV column is read as text: numbers are cast per cell below, so one bad cell
        # costs only itself (instead of failing the scan or turning the column into text).
        return pl.scan_csv(
            file,
            separator=cfg.separator,
            infer_schema=False,
            truncate_ragged_lines=True,
            encoding="utf8-lossy",
        )

    def _time_expr(self, lf: pl.LazyFrame, schema: pl.Schema) -> pl.Expr:
        cfg = self.config
        cols = cfg.time_columns
        if len(cols) > 1:
            raw = pl.concat_str([pl.col(c).cast(pl.String) for c in cols], separator=" ")
            dtype: pl.DataType = pl.String()
        else:
            raw, dtype = pl.col(cols[0]), schema[cols[0]]
        if isinstance(dtype, pl.Datetime):
            return raw.dt.cast_time_unit("us")
        if dtype == pl.Date:
            return raw.cast(pl.Datetime("us"))
        text = raw.cast(pl.String).str.strip_chars()
        if dtype == pl.String and not cfg.time_format:
            # CSV times are text: numbers (all of the sample) are epoch seconds.
            sample = lf.select(text.alias("t")).drop_nulls().head(1000).collect()["t"]
            if sample.len() and sample.cast(pl.Float64, strict=False).null_count() == 0:
                dtype = pl.Float64()
        if dtype.is_numeric():
            seconds = raw.cast(pl.Float64, strict=False)
            return pl.from_epoch((seconds * 1e6).cast(pl.Int64, strict=False), time_unit="us")
        if cfg.time_format:
            return text.str.strptime(pl.Datetime("us"), cfg.time_format, strict=False)
        # Lazy ISO parsing must be told up front whether the text carries offsets: look at
        # the first values (eagerly, where Polars may infer it; a bad first value is skipped).
        sample = lf.select(text.alias("t")).drop_nulls().head(100).collect().get_column("t")
        aware = False
        if sample.len():
            try:
                parsed = sample.str.to_datetime(time_unit="us", strict=False)
            except pl.exceptions.PolarsError:
                shown = ", ".join(repr(v[:40]) for v in sample.head(3))
                raise ConfigError(
                    [
                        ConfigIssue(
                            path="time_column",
                            message=f"{self.ctx.component}: no ISO time among the first values "
                            f"of {', '.join(cols)} ({shown}): set `time_format`",
                        )
                    ]
                ) from None
            aware = isinstance(parsed.dtype, pl.Datetime) and parsed.dtype.time_zone is not None
        if aware:
            return text.str.to_datetime(time_unit="us", time_zone="UTC", strict=False)
        return text.str.to_datetime(time_unit="us", strict=False)

    def _wide_metrics(self, lf: pl.LazyFrame, schema: pl.Schema) -> list[str]:
        """Metric columns of a wide file without `columns`: numeric ones, and text columns whose
        non-empty cells are mostly numbers (decided on the top of the file, so the same on
        every start). A few bad cells never drop a metric: they go to the dead letter."""
        cfg = self.config
        skip = {*cfg.time_columns, cfg.device_column}
        texts = [n for n, dt in schema.items() if n not in skip and dt == pl.String]
        counts: dict[str, tuple[int, int]] = {}
        if texts:
            exprs = []
            for name in texts:
                text = pl.col(name).str.strip_chars()
                filled = text.is_not_null() & ~text.str.to_lowercase().is_in(_MISSING_TEXT)
                number = text.str.replace_all(",", ".", literal=True) if cfg.decimal_comma else text
                exprs += [
                    filled.sum().alias(f"{name}\x00n"),
                    number.cast(pl.Float64, strict=False)
                    .is_not_null()
                    .sum()
                    .alias(f"{name}\x00ok"),
                ]
            sample = lf.head(_SAMPLE_ROWS).select(exprs).collect().row(0)
            counts = {name: (sample[2 * i], sample[2 * i + 1]) for i, name in enumerate(texts)}
        metrics: list[str] = []
        for name, dtype in schema.items():
            if name in skip:
                continue
            if dtype.is_numeric():
                metrics.append(name)
            elif name in counts:
                filled, ok = counts[name]
                if ok and ok * 2 > filled:
                    metrics.append(name)
                elif filled:
                    log.info(
                        "replay %s: column %r is text (%d of %d sampled cells are numbers): "
                        "not a metric; name it in `columns:` to read it as one",
                        self.ctx.component,
                        name,
                        ok,
                        filled,
                    )
        return metrics

    def _plan(self, file: str) -> _FilePlan:
        """The lazy scan of ``file`` with a parsed UTC `__ts` column, and its metric columns."""
        cfg = self.config
        identity = file_identity(file, self._format)
        lf = self._scan(file)
        schema = lf.collect_schema()
        needed = [*cfg.time_columns]
        if cfg.device_column:
            needed.append(cfg.device_column)
        if cfg.layout == "narrow":
            needed += ["metric", "value"]
        elif cfg.columns:
            needed += cfg.columns
        absent = [c for c in needed if c not in schema]
        if absent:
            raise ConfigError(
                [
                    ConfigIssue(
                        path="path",
                        message=f"{self.ctx.component}: {file!r} has no column(s) "
                        f"{', '.join(absent)} (it has {', '.join(schema.names())})",
                    )
                ]
            )
        ts = self._time_expr(lf, schema)
        parsed = lf.select(ts.alias(_TS)).collect_schema()[_TS]
        if isinstance(parsed, pl.Datetime) and parsed.time_zone is None:
            ts = ts.dt.replace_time_zone(cfg.timezone, ambiguous="earliest", non_existent="null")
        ts = ts.dt.convert_time_zone("UTC")
        metrics: list[str] = []
        if cfg.layout == "wide":
            metrics = list(cfg.columns) if cfg.columns else self._wide_metrics(lf, schema)
            if not metrics:
                raise ConfigError(
                    [ConfigIssue(path="columns", message=f"{file!r} has no numeric columns")]
                )
        numeric = metrics if cfg.layout == "wide" else ["value"]
        casts = {c: f"__cast{i}" for i, c in enumerate(numeric) if schema[c] == pl.String}
        lf = lf.with_columns(
            ts.alias(_TS),
            *[
                _number(c, schema[c], cfg.decimal_comma, careful=False).alias(name)
                for c, name in casts.items()
            ],
        )
        return _FilePlan(file, lf, metrics, dict(schema), identity, casts)

    def _narrow(
        self, batch: pl.DataFrame, plan: _FilePlan
    ) -> tuple[pl.DataFrame, list[tuple[int, str, str]]]:
        """Canonical narrow rows of consecutive source rows, in row order, with their `__row`;
        and the rejects ``(row, raw, reason)`` in row order: rows without a time, and each cell
        that is not a number. The rejects are dead-lettered when their rows are handed on, so
        a restart in the middle of a batch never dead-letters a row twice.
        """
        cfg = self.config
        rejects: list[tuple[int, str, str]] = []
        batch = batch.with_row_index(_ROW)
        casts = list(plan.casts.values())
        if batch.get_column(_TS).null_count():
            bad_ts = batch.filter(pl.col(_TS).is_null()).drop(casts)
            # Blank lines (every field empty) carry nothing to keep; anything else is kept.
            blank = pl.all_horizontal(pl.all().exclude(_TS, _ROW).is_null())
            for row in bad_ts.filter(~blank).drop(_TS).iter_rows(named=True):
                at = row.pop(_ROW)
                rejects.append((at, json.dumps(row, default=str), "no parseable time"))
            batch = batch.filter(pl.col(_TS).is_not_null())
        device = (
            pl.col(cfg.device_column).cast(pl.String).fill_null(self.ctx.device)
            if cfg.device_column
            else pl.lit(self.ctx.device, pl.String)
        )
        batch = batch.with_columns(device.alias(_DEVICE))
        numeric = plan.metrics if cfg.layout == "wide" else ["value"]
        recorded = batch.drop(casts)  # the cells as read, for the dead letter
        batch, bad = _numbers(batch, numeric, plan.dtypes, cfg.decimal_comma, plan.casts)
        if bad.height:
            rejects += self._rejects(
                recorded,
                bad,
                lambda r: _bad_reason(f"column {r['metric']!r}", r[_BAD]),
            )
        if cfg.layout == "wide":
            metrics = plan.metrics
            # Private names while unpivoting: a wide column may itself be called `value` or
            # `metric` (`timestamp,value` is the commonest export); it becomes that metric.
            narrow = (
                batch.select(_ROW, _TS, _DEVICE, *metrics)
                .unpivot(
                    metrics, index=[_ROW, _TS, _DEVICE], variable_name=_METRIC, value_name=_VALUE
                )
                .rename({_METRIC: "metric", _VALUE: "value"})
                .with_columns(pl.lit(None, pl.String).alias("unit"))
                .sort(_ROW, maintain_order=True)  # row-major: a row range is a narrow range
            )
            if bad.height:  # a bad cell is in the dead letter, not a null reading
                narrow = narrow.join(bad, on=[_ROW, "metric"], how="anti", maintain_order="left")
        else:
            unit = pl.col("unit").cast(pl.String) if "unit" in batch.columns else pl.lit(None)
            narrow = batch.select(
                _ROW,
                _TS,
                _DEVICE,
                pl.col("metric").cast(pl.String),
                "value",
                unit.cast(pl.String).alias("unit"),
            )
            if bad.height:
                narrow = narrow.filter(~pl.col(_ROW).is_in(bad[_ROW].implode()))
            nameless = narrow.filter(pl.col("metric").is_null())
            if nameless.height:
                rejects += self._rejects(recorded, nameless, lambda _r: "no metric name")
                narrow = narrow.filter(pl.col("metric").is_not_null())
        value = pl.col("value").fill_nan(None)
        if cfg.missing_values:
            value = pl.when(value.is_in(cfg.missing_values)).then(None).otherwise(value)
        unit_map = pl.col("metric").replace_strict(cfg.units, default=None, return_dtype=pl.String)
        narrow = narrow.select(
            _ROW,
            pl.col(_TS).alias("ts"),
            pl.col(_DEVICE).alias("device"),
            pl.lit(self.ctx.component, pl.String).alias("source"),
            "metric",
            value.alias("value"),
            pl.col("unit").fill_null(unit_map),
        )
        if cfg.drop_missing:
            narrow = narrow.filter(pl.col("value").is_not_null())
        rejects.sort(key=lambda r: r[0])
        return narrow, rejects

    @staticmethod
    def _rejects(
        batch: pl.DataFrame, bad: pl.DataFrame, reason: Callable[[dict[str, Any]], str]
    ) -> list[tuple[int, str, str]]:
        """Each bad cell/row with its whole source row (only bad ones reach Python)."""
        raw = batch.filter(pl.col(_ROW).is_in(bad[_ROW].implode())).drop(_TS, _DEVICE)
        by_row = {r.pop(_ROW): r for r in raw.iter_rows(named=True)}
        return [
            (r[_ROW], json.dumps(by_row.get(r[_ROW], {}), default=str), reason(r))
            for r in bad.iter_rows(named=True)
        ]

    def _dead_letter(self, rejects: list[tuple[int, str, str]], lo: int, hi: int) -> None:
        """Dead-letter the rejects of source rows ``[lo, hi)`` of the batch being handed on."""
        start = bisect.bisect_left(rejects, lo, key=lambda r: r[0])
        stop = bisect.bisect_left(rejects, hi, key=lambda r: r[0])
        for _row, raw, reason in rejects[start:stop]:
            self.ctx.reject(raw, reason)

    @staticmethod
    def _finish(part: pl.DataFrame) -> pl.DataFrame:
        """A chunk as handed on: canonical schema, time order within the chunk."""
        part = part.drop(_ROW)
        # Recorded order is time order for the windows downstream; ties keep file order.
        if not part.get_column("ts").is_sorted():  # recordings usually are: skip the sort
            part = part.sort("ts", maintain_order=True)
        return part.cast(POLARS_SCHEMA)  # type: ignore[arg-type]

    # -- streaming ---------------------------------------------------------------------------

    def _batches(self, plan: _FilePlan, skip: int) -> Iterator[pl.DataFrame]:
        per = max(1, self.config.chunk_rows // max(1, len(plan.metrics)))
        lf = plan.lf.slice(skip) if skip else plan.lf
        if self._format == "parquet":
            return _on_demand(lf, per, _PARQUET_READ_CHUNKS * per)
        return iter(lf.collect_batches(chunk_size=per, lazy=True))

    async def stream(self) -> AsyncIterator[pl.DataFrame]:
        """Chunks from the cursor on: a restarted stream continues, it never starts over."""
        if self._files is None:
            await self.open()
        files = self._files or []
        pacer = None if self.config.speed == "max" else Pacer(float(self.config.speed), self.clock)
        state: dict[str, int | None] = {"running_max": None}
        while self._cursor[0] < len(files):
            index, skip = self._cursor
            file = files[index]
            plan = self._plan_cache
            self._plan_cache = None
            try:
                if plan is None or plan.file != file:
                    plan = await asyncio.to_thread(self._plan, file)
                batches = await asyncio.to_thread(self._batches, plan, skip)
            except (ConfigError, pl.exceptions.PolarsError, OSError) as exc:
                # One unreadable file of a glob costs itself; the next one goes on.
                log.error("replay %s: skipping %s: %s", self.ctx.component, file, exc)
                self.ctx.reject(file, f"cannot replay this file: {exc}")
                self._cursor = (index + 1, 0)
                continue
            async for part in self._replay_file(plan, index, skip, batches, pacer, state):
                yield part

    async def _next(
        self, batches: Iterator[pl.DataFrame], plan: _FilePlan, rows: int
    ) -> pl.DataFrame | None:
        try:
            return await asyncio.to_thread(next, batches, None)
        except (pl.exceptions.PolarsError, OSError) as exc:
            # A damaged file (bad compression, cut short): keep what was read, say what was not.
            log.error(
                "replay %s: %s is unreadable after row %d: %s; going on with the next file",
                self.ctx.component,
                plan.file,
                rows,
                exc,
            )
            self.ctx.reject(plan.file, f"unreadable after row {rows}: {exc}")
            return None

    async def _replay_file(
        self,
        plan: _FilePlan,
        index: int,
        rows: int,
        batches: Iterator[pl.DataFrame],
        pacer: Pacer | None,
        state: dict[str, int | None],
    ) -> AsyncIterator[pl.DataFrame]:
        ahead = await self._next(batches, plan, rows)
        if ahead is None:  # nothing (left) in this file: hand on the position alone
            self._hand(plan, index, rows, done=True, lo=rows)
            yield self._finish(pl.DataFrame(schema={_ROW: pl.UInt32, **POLARS_SCHEMA}))
            return
        while ahead is not None:
            batch = ahead
            # One batch of look-ahead: the last chunk of a file says so (done), and reading
            # the next batch overlaps with handing on this one.
            ahead = await self._next(batches, plan, rows + batch.height)
            narrow, rejects = await asyncio.to_thread(self._narrow, batch, plan)
            if pacer is None:
                # In a thread too: a Polars call on the event loop waits for Polars' pool,
                # which the pipeline keeps busy, and every other task of the loop waits with it.
                finished = await asyncio.to_thread(self._finish, narrow)
                self._dead_letter(rejects, 0, batch.height)
                self._hand(plan, index, rows + batch.height, done=ahead is None, lo=rows)
                yield finished
            else:
                row_index = narrow.get_column(_ROW)  # ascending: narrow is in row order
                async for lo, hi in self._paced(batch, pacer, state):
                    start = row_index.search_sorted(lo, side="left")
                    stop = row_index.search_sorted(hi, side="left")
                    last = ahead is None and hi == batch.height
                    self._dead_letter(rejects, lo, hi)
                    self._hand(plan, index, rows + hi, done=last, lo=rows + lo)
                    if stop > start or last:
                        yield self._finish(narrow.slice(start, stop - start))
            rows += batch.height

    async def _paced(
        self, batch: pl.DataFrame, pacer: Pacer, state: dict[str, int | None]
    ) -> AsyncIterator[tuple[int, int]]:
        """Source-row ranges of ``batch`` as they fall due (sleeping in between)."""
        n = batch.height
        # Pace on the running maximum, so an out-of-order row is simply due at once; a row
        # without a time travels with its neighbours.
        pace = batch.get_column(_TS).dt.epoch("us").cum_max().forward_fill()
        running_max = state["running_max"]
        if running_max is not None:
            pace = pace.fill_null(running_max).clip(lower_bound=running_max)
        pace = pace.backward_fill()
        if pace.null_count():  # no time in the batch, none before: nothing to wait for
            yield 0, n
            return
        state["running_max"] = int(pace[-1])
        pos = 0
        while pos < n:
            limit = pacer.limit(int(pace[pos]))
            end = min(pace.search_sorted(limit, side="right"), n)
            if end <= pos:
                await self.sleep(max(pacer.delay(int(pace[pos])), 1e-6))
                continue
            yield pos, end
            pos = end
