"""Replay a recorded CSV or Parquet file as if the sensors were live.

Rows keep their recorded event times; only the pace of delivery follows the wall clock (real
time, a speed factor, or as fast as possible). The file is scanned lazily and converted to the
canonical narrow schema batch by batch with vectorised Polars operations, so a 10M-row file
never passes through per-row Python.
"""

from __future__ import annotations

import asyncio
import json
import time
import zoneinfo
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field, field_validator, model_validator

from collector.errors import ConfigError, ConfigIssue
from collector.plugin import Context, Source, SourceConfig
from collector.schema import POLARS_SCHEMA

_CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_TS = "__ts"
_PACE = "__pace"


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
    timezone: str = Field(
        default="UTC", description="IANA zone of times recorded without an offset."
    )
    layout: Literal["narrow", "wide"] = Field(
        default="narrow",
        description="`narrow`: `metric` and `value` columns; `wide`: every numeric column "
        "(except time and device) is a metric.",
    )
    columns: list[str] | None = Field(
        default=None, description="wide: only these columns become metrics."
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

    @field_validator("speed")
    @classmethod
    def _positive_speed(cls, value: float | str) -> float | str:
        if value != "max" and float(value) <= 0:
            raise ValueError("speed must be above 0, or `max`")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
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


class ReplaySource(Source):
    """Replays a recorded CSV/Parquet file at real time, a speed factor, or as fast as possible."""

    Config = ReplayConfig
    description = "Replay a recorded CSV or Parquet file at real time, a speed factor or max."
    example = """\
- name: air
  type: replay
  path: ./sample_data/AirQualityUCI.csv
  separator: ";"
  decimal_comma: true
  time_column: [Date, Time]
  time_format: "%d/%m/%Y %H.%M.%S"
  timezone: Europe/Rome
  layout: wide
  missing_values: [-200]
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
        self._plan_cache: tuple[pl.LazyFrame, list[str]] | None = None

    async def open(self) -> None:
        path = self.config.path
        if not any(c in path for c in "*?[") and not Path(path).expanduser().exists():
            raise ConfigError(
                [ConfigIssue(path="path", message=f"{self.ctx.component}: no file {path!r}")]
            )
        # Columns and time format are checked here, where a failure stops this source, rather
        # than in stream(), which the runtime would restart again and again.
        self._plan_cache = await asyncio.to_thread(self._plan)

    # -- building the scan -------------------------------------------------------------------

    def _scan(self) -> pl.LazyFrame:
        cfg = self.config
        path = str(Path(cfg.path).expanduser())
        if resolve_format(cfg.path, cfg.format) == "parquet":
            return pl.scan_parquet(path)
        return pl.scan_csv(
            path,
            separator=cfg.separator,
            decimal_comma=cfg.decimal_comma,
            infer_schema_length=10_000,
            truncate_ragged_lines=True,
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
        if dtype.is_numeric():
            return pl.from_epoch((raw.cast(pl.Float64) * 1e6).cast(pl.Int64), time_unit="us")
        text = raw.cast(pl.String).str.strip_chars()
        if cfg.time_format:
            return text.str.strptime(pl.Datetime("us"), cfg.time_format, strict=False)
        # Lazy ISO parsing must be told up front whether the text carries offsets: look at
        # the first value (eagerly, where Polars may infer it).
        sample = lf.select(text.alias("t")).drop_nulls().head(1).collect().get_column("t")
        aware = False
        if sample.len():
            parsed = sample.str.to_datetime(time_unit="us", strict=False)
            aware = isinstance(parsed.dtype, pl.Datetime) and parsed.dtype.time_zone is not None
        if aware:
            return text.str.to_datetime(time_unit="us", time_zone="UTC", strict=False)
        return text.str.to_datetime(time_unit="us", strict=False)

    def _plan(self) -> tuple[pl.LazyFrame, list[str]]:
        """The lazy scan with a parsed UTC `__ts` column, and the metric columns (wide)."""
        cfg = self.config
        lf = self._scan()
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
                        message=f"{self.ctx.component}: {cfg.path!r} has no column(s) "
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
            skip = {*cfg.time_columns, cfg.device_column}
            metrics = cfg.columns or [
                name for name, dt in schema.items() if name not in skip and dt.is_numeric()
            ]
            if not metrics:
                raise ConfigError(
                    [ConfigIssue(path="columns", message=f"{cfg.path!r} has no numeric columns")]
                )
        return lf.with_columns(ts.alias(_TS)), metrics

    def _narrow(self, batch: pl.DataFrame, metrics: list[str]) -> pl.DataFrame:
        """Canonical narrow rows from one scanned batch (rows without a time are rejected)."""
        cfg = self.config
        bad = batch.filter(pl.col(_TS).is_null())
        if bad.height:
            # Blank lines (every field empty) carry nothing to keep; anything else is kept.
            blank = pl.all_horizontal(pl.all().exclude(_TS).is_null())
            for row in bad.filter(~blank).drop(_TS).iter_rows(named=True):
                self.ctx.reject(json.dumps(row, default=str), "no parseable time")
            batch = batch.filter(pl.col(_TS).is_not_null())
        device = (
            pl.col(cfg.device_column).cast(pl.String).fill_null(self.ctx.device)
            if cfg.device_column
            else pl.lit(self.ctx.device, pl.String)
        )
        batch = batch.with_columns(device.alias("__device"))
        if cfg.layout == "wide":
            narrow = (
                batch.select(_TS, "__device", *[pl.col(m).cast(pl.Float64) for m in metrics])
                .unpivot(metrics, index=[_TS, "__device"], variable_name="metric")
                .with_columns(pl.lit(None, pl.String).alias("unit"))
            )
        else:
            unit = pl.col("unit").cast(pl.String) if "unit" in batch.columns else pl.lit(None)
            narrow = batch.select(
                _TS,
                "__device",
                pl.col("metric").cast(pl.String),
                pl.col("value").cast(pl.Float64, strict=False),
                unit.cast(pl.String).alias("unit"),
            )
        value = pl.col("value").fill_nan(None)
        if cfg.missing_values:
            value = pl.when(value.is_in(cfg.missing_values)).then(None).otherwise(value)
        unit_map = pl.col("metric").replace_strict(cfg.units, default=None, return_dtype=pl.String)
        narrow = narrow.select(
            pl.col(_TS).alias("ts"),
            pl.col("__device").alias("device"),
            pl.lit(self.ctx.component, pl.String).alias("source"),
            "metric",
            value.alias("value"),
            pl.col("unit").fill_null(unit_map),
        )
        if cfg.drop_missing:
            narrow = narrow.filter(pl.col("value").is_not_null())
        # Recorded order is time order for the windows downstream; ties keep file order.
        if not narrow.get_column("ts").is_sorted():  # recordings usually are: skip the sort
            narrow = narrow.sort("ts", maintain_order=True)
        return narrow.cast(POLARS_SCHEMA)  # type: ignore[arg-type]

    # -- streaming ---------------------------------------------------------------------------

    def _batches(self, lf: pl.LazyFrame, width: int) -> Iterator[pl.DataFrame]:
        chunk = max(1, self.config.chunk_rows // max(1, width))
        return iter(lf.collect_batches(chunk_size=chunk, lazy=True))

    async def stream(self) -> AsyncIterator[pl.DataFrame]:
        cfg = self.config
        if self._plan_cache is None:
            self._plan_cache = await asyncio.to_thread(self._plan)
        lf, metrics = self._plan_cache
        batches = await asyncio.to_thread(self._batches, lf, len(metrics) or 1)
        pacer = None if cfg.speed == "max" else Pacer(float(cfg.speed), self.clock)
        running_max: int | None = None
        while True:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                return
            narrow = await asyncio.to_thread(self._narrow, batch, metrics)
            if narrow.is_empty():
                continue
            if pacer is None:
                for start in range(0, narrow.height, cfg.chunk_rows):
                    yield narrow.slice(start, cfg.chunk_rows)
                continue
            # Pace on the running maximum, so an out-of-order row is simply due at once.
            pace = narrow.get_column("ts").dt.epoch("us").cum_max()
            if running_max is not None:
                pace = pace.clip(lower_bound=running_max)
            running_max = int(pace[-1])
            async for part in self._paced(narrow, pace, pacer):
                yield part

    async def _paced(
        self, narrow: pl.DataFrame, pace: pl.Series, pacer: Pacer
    ) -> AsyncIterator[pl.DataFrame]:
        pos, n = 0, narrow.height
        while pos < n:
            limit = pacer.limit(int(pace[pos]))
            end = min(pace.search_sorted(limit, side="right"), pos + self.config.chunk_rows)
            if end <= pos:
                await self.sleep(max(pacer.delay(int(pace[pos])), 1e-6))
                continue
            yield narrow.slice(pos, end - pos)
            pos = end
