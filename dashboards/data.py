"""Pure query functions behind the dashboard, on Polars lazy frames; no Streamlit here.

Reading goes through :mod:`collector.lakequery` (the same code as ``collector export``), for a
lake and for a spool alike, so what the dashboard shows and what a user downloads are the same
rows. Every view function first maps rows to one "stats" shape (``mean``/``min``/``max``/
``count`` per row): a raw reading is a window of one (mean = min = max = value, count = 1) and
an aggregate is itself. Downsampling and tiles then work the same on raw lakes, aggregate lakes
and lakes mixing both.

The page is reachable by whoever reaches its port, so what it reads is bounded here: local paths
only under the lake and data dir it was started with (:func:`allowed_roots`, from the
environment, never from the page), or an explicit ``s3://`` URL; the row-filter SQL goes through
the collector's one SQL gate (:mod:`collector.sqlexpr`) like every other SQL text.
"""


from __future__ import annotations

import json
import math
import os
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import polars as pl

from collector import lakequery
from collector.lakequery import LakeFile, LakeQuery, list_files, scan

LAKE_ENV = "EDGE_COLLECTOR_LAKE"
DATA_DIR_ENV = "EDGE_COLLECTOR_DATA_DIR"
METRICS_URL_ENV = "EDGE_COLLECTOR_METRICS_URL"
THRESHOLDS_ENV = "EDGE_COLLECTOR_THRESHOLDS"
DEFAULT_METRICS_URL = "http://127.0.0.1:9108/metrics"
SAMPLE_LAKE = Path(__file__).resolve().parent.parent / "sample_data" / "lake"

STATS_SCHEMA: dict[str, pl.DataType] = {
    "ts": pl.Datetime("us", "UTC"),
    "device": pl.String(),
    "source": pl.String(),
    "metric": pl.String(),
    "unit": pl.String(),
    "mean": pl.Float64(),
    "min": pl.Float64(),
    "max": pl.Float64(),
    "count": pl.Int64(),
}

# ---------------------------------------------------------------------------------------------
# data sources


def default_lake(cwd: Path | None = None) -> str:
    """``$EDGE_COLLECTOR_LAKE``, else ``./data/lake`` when a collector has written it, else the
    sample lake shipped with the repository."""
    env = os.environ.get(LAKE_ENV)
    if env:
        return env
    local = (cwd or Path.cwd()) / "data" / "lake"
    return str(local) if local.is_dir() else str(SAMPLE_LAKE)


def default_data_dir(cwd: Path | None = None) -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or (cwd or Path.cwd()) / "data")


class PathRefused(ValueError):
    """A path typed in the page (or its URL) outside the folders the dashboard may read."""


def allowed_roots(cwd: Path | None = None) -> tuple[Path, ...]:
    """The local folders the page may read: the lake and the data dir it was started with (from
    ``$EDGE_COLLECTOR_LAKE``/``$EDGE_COLLECTOR_DATA_DIR`` or their defaults) and the sample lake
    shipped with the code. Resolved, so a symlink cannot lead out of them."""
    roots: list[Path] = []
    lake = default_lake(cwd)
    if not lake.startswith("s3://"):
        roots.append(_resolve(lake, cwd))
    roots.append(_resolve(str(default_data_dir(cwd)), cwd))
    roots.append(SAMPLE_LAKE.resolve())
    return tuple(dict.fromkeys(roots))


def _resolve(path: str, cwd: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = (cwd or Path.cwd()) / p
    return p.resolve()


def confine(path: str, roots: Sequence[Path] | None = None, cwd: Path | None = None) -> str:
    """``path`` when the page may read it: an ``s3://`` URL, or a local path inside one of
    ``roots`` (default :func:`allowed_roots`) once resolved. Otherwise :class:`PathRefused`
    with a message that says how to start the dashboard on another folder."""
    text = path.strip()
    if text.startswith("s3://"):
        return text
    if "://" in text or text.startswith("file:"):
        raise PathRefused(f"{text!r}: only local folders or s3:// URLs can be read")
    roots = tuple(roots) if roots is not None else allowed_roots(cwd)
    resolved = _resolve(text or ".", cwd)
    if any(resolved == r or r in resolved.parents for r in roots):
        return text
    where = ", ".join(str(r) for r in roots)
    raise PathRefused(
        f"{text!r} is outside the folders this dashboard was started with ({where}); start it "
        f"with {LAKE_ENV}=<lake> or {DATA_DIR_ENV}=<data dir> to read another one"
    )


def lake_files(query: LakeQuery) -> list[LakeFile]:
    """The partition-pruned listing (:func:`collector.lakequery.listing_key` keys caches); for a
    spool folder, its batch files."""
    return list_files(query)


def lake_frame(query: LakeQuery, files: Sequence[LakeFile] | None = None) -> pl.LazyFrame:
    return scan(query, files)


def spool_sinks(data_dir: Path) -> list[str]:
    """Sink names that have a spool folder under ``<data_dir>/spool``."""
    root = data_dir / "spool"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def spool_root(data_dir: Path, sink: str) -> Path:
    """One sink's spool folder: a source :class:`LakeQuery` reads like a lake."""
    return data_dir / "spool" / sink


def spool_paths(data_dir: Path, sink: str, *, inflight: bool = True) -> list[Path]:
    """Spooled batches not yet delivered, oldest first (ready files, then in-flight ones)."""
    folder = spool_root(data_dir, sink)
    if not folder.is_dir():
        return []
    return [Path(f.path) for f in lakequery.spool_files(folder, inflight=inflight)]


def read_spool(paths: Sequence[Path]) -> pl.DataFrame:
    """Rows of spooled Arrow IPC stream files; a file cut short by a crash is skipped."""
    frame = lakequery.read_spool(paths)
    return pl.DataFrame(schema=STATS_SCHEMA) if frame is None else frame


def spool_frame(query: LakeQuery, paths: Sequence[Path]) -> pl.LazyFrame:
    """Spooled rows with the same filters a lake query applies (one row per window too): the
    same :func:`collector.lakequery.scan` as a lake."""
    files = [LakeFile(path=str(p), partition=(), size=0, mtime_ns=0) for p in paths]
    return scan(query, files)


# ---------------------------------------------------------------------------------------------
# one shape for raw readings and aggregates


def to_stats(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Rows as (ts, device, source, metric, unit, mean, min, max, count).

    A raw reading counts as a window of one: mean = min = max = value, count = 1 (0 if null).
    """
    cols = set(lf.collect_schema().names())

    def col(name: str, dtype: pl.DataType) -> pl.Expr:
        return pl.col(name).cast(dtype) if name in cols else pl.lit(None, dtype)

    value = col("value", pl.Float64())
    raw_count = value.is_not_null().cast(pl.Int64)
    agg_mean = col("mean", pl.Float64())
    has_agg = agg_mean.is_not_null() | col("min", pl.Float64()).is_not_null()
    return lf.select(
        col("ts", pl.Datetime("us", "UTC")).alias("ts"),
        col("device", pl.String()).alias("device"),
        col("source", pl.String()).alias("source"),
        col("metric", pl.String()).alias("metric"),
        col("unit", pl.String()).alias("unit"),
        pl.coalesce(agg_mean, value).alias("mean"),
        pl.coalesce(col("min", pl.Float64()), value).alias("min"),
        pl.coalesce(col("max", pl.Float64()), value).alias("max"),
        pl.when(has_agg)
        .then(col("count", pl.Int64()).fill_null(1))
        .otherwise(raw_count)
        .alias("count"),
    )


# ---------------------------------------------------------------------------------------------
# automatic resolution

NICE_BUCKETS: tuple[timedelta, ...] = tuple(
    timedelta(seconds=s)
    for s in (
        1,
        2,
        5,
        10,
        15,
        30,
        60,
        120,
        300,
        600,
        900,
        1800,
        3600,
        7200,
        10800,
        21600,
        43200,
        86400,
        172800,
        604800,
    )
)


def choose_bucket(
    start: datetime,
    end: datetime,
    *,
    series: int = 1,
    max_points: int = 2000,
    max_total: int = 40_000,
) -> timedelta:
    """The smallest "nice" bucket giving at most ``max_points`` per series and ``max_total`` in
    all, so a 30-day range of many devices draws as fast as an hour of one."""
    span = max((end - start).total_seconds(), 1.0)
    per_series = max(1, min(max_points, max_total // max(series, 1)))
    need = span / per_series
    for bucket in NICE_BUCKETS:
        if bucket.total_seconds() >= need:
            return bucket
    return timedelta(days=math.ceil(need / 86400))


def format_bucket(bucket: timedelta | None) -> str:
    if bucket is None:
        return "raw"
    seconds = int(bucket.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _every(bucket: timedelta) -> str:
    return f"{int(bucket.total_seconds() * 1_000_000)}us"


def native_step(
    stats: pl.LazyFrame, keys: Sequence[str] = ("device", "metric")
) -> timedelta | None:
    """The finest spacing the data is stored at: the smallest, over series, of the median step
    between a series' consecutive timestamps (1 minute for 1-minute aggregates), or None when
    no series has two timestamps."""
    step = (
        stats.group_by(list(keys))
        .agg(pl.col("ts").unique().sort().diff().drop_nulls().median().alias("step"))
        .select(pl.col("step").min())
        .collect()
        .item()
    )
    if step is None or step <= timedelta(0):
        return None
    return step if isinstance(step, timedelta) else None


def series(
    stats: pl.LazyFrame,
    *,
    start: datetime,
    end: datetime,
    resolution: Literal["auto", "raw"] | timedelta = "auto",
    by_device: bool = True,
    max_points: int = 2000,
    max_total: int = 40_000,
) -> tuple[pl.DataFrame, timedelta | None]:
    """Chart rows (ts, device, metric, mean, min, max, count) and the resolution shown.

    ``auto`` picks the bucket with :func:`choose_bucket` from the number of series actually
    present; ``raw`` returns rows unaggregated (resolution ``None``). Bucket mean is the
    count-weighted mean of the rows' means (exact for both readings and aggregates), min and max
    are the extremes, count the sum. ``by_device=False`` merges devices into one series per
    metric (device shown as ``all``).

    A bucket no coarser than the data itself (1-second buckets over 1-minute aggregates) cannot
    summarise anything: the rows are returned as stored and the resolution is the data's own
    step (:func:`native_step`), so the page says "1m" for 1-minute data, never "1s".
    """
    keys = ["device", "metric"] if by_device else ["metric"]
    columns = ("ts", "device", "metric", "mean", "min", "max", "count")
    if resolution == "raw":
        frame = stats.select(*columns)
        if not by_device:
            frame = frame.with_columns(pl.lit("all").alias("device"))
        return frame.sort("metric", "device", "ts").collect(), None
    if resolution == "auto":
        n_series = stats.select(pl.struct(keys).n_unique()).collect().item() or 1
        bucket = choose_bucket(
            start, end, series=n_series, max_points=max_points, max_total=max_total
        )
    else:
        bucket = resolution
    native = native_step(stats, ["device", "metric"])
    if by_device and native is not None and bucket <= native:
        rows = stats.select(*columns).sort("metric", "device", "ts").collect()
        return rows, native
    weighted = pl.when(pl.col("mean").is_not_null()).then(pl.col("count")).otherwise(0)
    frame = (
        stats.with_columns(pl.col("ts").dt.truncate(_every(bucket)).alias("ts"))
        .group_by(["ts", *keys])
        .agg(
            ((pl.col("mean") * weighted).sum() / weighted.sum()).alias("mean"),
            pl.col("min").min().alias("min"),
            pl.col("max").max().alias("max"),
            pl.col("count").sum().alias("count"),
        )
    )
    if not by_device:
        frame = frame.with_columns(pl.lit("all").alias("device"))
    out = frame.select(*columns)
    if native is not None and bucket < native:
        bucket = native  # combined devices: each bucket holds at most one row per device
    return out.sort("metric", "device", "ts").collect(), bucket


# ---------------------------------------------------------------------------------------------
# the time axis

TICK_STEPS: tuple[timedelta, ...] = tuple(
    timedelta(seconds=s)
    for s in (
        1, 2, 5, 10, 15, 30,
        60, 120, 300, 600, 900, 1800,
        3600, 7200, 10800, 21600, 43200,
        86400, 172800, 604800, 1209600, 2592000, 7776000, 31536000,
    )
)  # fmt: skip


def time_axis(start: datetime, end: datetime, *, ticks: int = 8) -> tuple[list[datetime], str]:
    """Tick times for a chart over [start, end] and a strftime format whose labels never repeat.

    Ticks are multiples of a round step (at most ``ticks`` of them, aligned in UTC) and the
    format shows the finest unit the step needs and a coarser one whenever the range spans it
    (a date once the range crosses midnight), so no two ticks share a label: letting the chart
    library format every tick ``%m-%d %H:%M`` printed the same minute several times on short
    ranges.
    """
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    if end <= start:
        end = start + timedelta(seconds=1)
    span = end - start
    step = next((s for s in TICK_STEPS if span / s <= ticks - 1), TICK_STEPS[-1])
    if step >= timedelta(days=365):
        step = timedelta(days=365 * max(1, math.ceil(span / timedelta(days=365) / ticks)))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    t = epoch + math.ceil((start - epoch) / step) * step
    values: list[datetime] = []
    while t <= end:
        values.append(t)
        t += step
    values = values or [start]
    if step >= timedelta(days=1):
        fmt = "%Y-%m-%d"
    else:
        clock = "%H:%M:%S" if step < timedelta(minutes=1) else "%H:%M"
        one_day = len({v.date() for v in values}) == 1
        fmt = clock if one_day else f"%m-%d {clock}"
    return values, fmt


# ---------------------------------------------------------------------------------------------
# tiles, thresholds, histogram, freshness


def latest(stats: pl.LazyFrame, *, compare: timedelta | None = None) -> pl.DataFrame:
    """Latest value per (device, metric) and its change.

    ``compare=None``: change since the previous row; otherwise since the last row at or before
    ``latest ts - compare`` (null when the data does not reach that far back).
    """
    rows = stats.filter(pl.col("mean").is_not_null())
    newest = pl.col("ts").arg_max()
    last = rows.group_by(["device", "metric"]).agg(
        pl.col("ts").max(),
        pl.col("mean").get(newest).alias("value"),
        pl.col("unit").get(newest).alias("unit"),
        pl.col("mean").top_k_by("ts", 2).alias("_top2"),  # newest first: no full sort needed
    )
    if compare is None:
        out = last.with_columns(pl.col("_top2").list.get(1, null_on_oob=True).alias("previous"))
    else:
        target = last.with_columns((pl.col("ts") - compare).alias("_at")).sort("_at")
        prior = rows.sort("ts").select(
            pl.col("ts").alias("_at"), "device", "metric", pl.col("mean").alias("previous")
        )
        out = target.join_asof(
            prior, on="_at", by=["device", "metric"], strategy="backward", check_sortedness=False
        )
    return (
        out.with_columns((pl.col("value") - pl.col("previous")).alias("change"))
        .select("device", "metric", "ts", "value", "previous", "change", "unit")
        .sort("metric", "device")
        .collect()
    )


@dataclass(frozen=True)
class Threshold:
    """Bounds for one metric; a row exceeds when its max is above ``high`` or min below ``low``."""

    low: float | None = None
    high: float | None = None


def exceedances(
    stats: pl.LazyFrame, thresholds: Mapping[str, Threshold], *, limit: int | None = None
) -> pl.DataFrame:
    """Rows beyond their metric's threshold, newest first: ts, device, metric, kind, peak,
    threshold, unit. For aggregates the window's max/min is what exceeded, so a spike hidden in
    a mean still shows."""
    parts: list[pl.LazyFrame] = []
    for metric, th in thresholds.items():
        rows = stats.filter(pl.col("metric") == metric)
        for kind, column, bound, beyond in (
            ("above", "max", th.high, lambda c, b: c > b),
            ("below", "min", th.low, lambda c, b: c < b),
        ):
            if bound is None:
                continue
            parts.append(
                rows.filter(beyond(pl.col(column), bound)).select(
                    "ts",
                    "device",
                    "metric",
                    pl.lit(kind).alias("kind"),
                    pl.col(column).alias("peak"),
                    pl.lit(float(bound)).alias("threshold"),
                    "unit",
                )
            )
    if not parts:
        return pl.DataFrame(
            schema={
                "ts": STATS_SCHEMA["ts"],
                "device": pl.String(),
                "metric": pl.String(),
                "kind": pl.String(),
                "peak": pl.Float64(),
                "threshold": pl.Float64(),
                "unit": pl.String(),
            }
        )
    out = pl.concat(parts).sort(["ts", "device", "metric"], descending=[True, False, False])
    return (out.head(limit) if limit is not None else out).collect()


def histogram(stats: pl.LazyFrame, *, bins: int = 30) -> pl.DataFrame:
    """Equal-width histogram of row means per metric: metric, bin, start, end, count."""
    values = stats.filter(pl.col("mean").is_not_null() & pl.col("mean").is_finite())
    bounds = values.group_by("metric").agg(
        pl.col("mean").min().alias("lo"), pl.col("mean").max().alias("hi")
    )
    width = pl.when(pl.col("hi") > pl.col("lo")).then((pl.col("hi") - pl.col("lo")) / bins)
    width = width.otherwise(1.0)
    return (
        values.join(bounds, on="metric")
        .with_columns(width.alias("_w"))
        .with_columns(
            ((pl.col("mean") - pl.col("lo")) / pl.col("_w"))
            .floor()
            .clip(0, bins - 1)
            .cast(pl.Int64)
            .alias("bin")
        )
        .group_by(["metric", "bin"])
        .agg(
            pl.len().cast(pl.Int64).alias("count"),
            (pl.col("lo").first() + pl.col("bin").first() * pl.col("_w").first()).alias("start"),
            (pl.col("lo").first() + (pl.col("bin").first() + 1) * pl.col("_w").first()).alias(
                "end"
            ),
        )
        .select("metric", "bin", "start", "end", "count")
        .sort("metric", "bin")
        .collect()
    )


def freshness(
    stats: pl.LazyFrame, *, now: datetime | None = None, gap: timedelta | None = None
) -> pl.DataFrame:
    """Per device: last reading, its age at ``now``, rows, and gaps between consecutive
    timestamps.

    ``now`` is the wall clock (a collector stopped 20 minutes ago shows an age of 20 minutes,
    whatever the time range shown); with ``now=None`` the age is left null, to be filled at
    display time by :func:`with_age` (so a cached result never shows a stale age).
    A gap is a step longer than ``gap`` or, by default, three times the device's median step
    (so a 5 s source and a 1-minute aggregate are judged on their own cadence).
    """
    step = pl.col("ts").unique().sort().diff().drop_nulls()
    limit = pl.lit(gap) if gap is not None else step.median() * 3
    is_gap = step > limit
    frame = (
        stats.group_by("device")
        .agg(
            pl.col("ts").max().alias("last_ts"),
            pl.col("ts").n_unique().cast(pl.Int64).alias("timestamps"),
            step.median().alias("typical_step"),
            is_gap.sum().cast(pl.Int64).alias("gaps"),
            step.filter(is_gap).max().alias("longest_gap"),
        )
        .with_columns(pl.lit(None, pl.Duration("us")).alias("age"))
        .select("device", "last_ts", "age", "timestamps", "typical_step", "gaps", "longest_gap")
        .sort("device")
        .collect()
    )
    return frame if now is None else with_age(frame, now)


def with_age(fresh: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """:func:`freshness` rows with ``age = now - last_ts`` (``now``: the wall clock)."""
    age = (pl.lit(now.astimezone(UTC)) - pl.col("last_ts")).cast(pl.Duration("us"))
    return fresh.with_columns(age.alias("age"))


def data_dir_for(lake: str, cwd: Path | None = None) -> Path | None:
    """The collector data dir whose health goes with ``lake``, or None when none does.

    The lake and data dir the dashboard was started with go together; a lake in a folder
    that holds a collector's ``status.json``, ``spool/`` or ``state/`` (``<data_dir>/lake``)
    goes with that folder; an ``s3://`` lake with the started-with data dir (the collector on
    this device uploads there). Any other lake (``?lake=sample_data/lake``) has none: its page
    must not show the health of an unrelated collector.
    """
    if lake.startswith("s3://"):
        return default_data_dir(cwd)
    path = _resolve(lake, cwd)
    started = default_lake(cwd)
    chosen = bool(os.environ.get(LAKE_ENV)) or _resolve(started, cwd) != SAMPLE_LAKE.resolve()
    if chosen and not started.startswith("s3://") and path == _resolve(started, cwd):
        return default_data_dir(cwd)
    parent = path.parent
    if any((parent / name).exists() for name in ("status.json", "spool", "state")):
        return parent
    return None


def bounds(stats: pl.LazyFrame) -> tuple[datetime, datetime] | None:
    """(first, last) timestamp, or None when there are no rows."""
    row = stats.select(pl.col("ts").min().alias("a"), pl.col("ts").max().alias("b")).collect()
    a, b = row.row(0)
    return None if a is None else (a, b)


def choices(stats: pl.LazyFrame) -> dict[str, list[str]]:
    """Distinct devices, sources and metrics, for the filter widgets."""
    out: dict[str, list[str]] = {}
    for name in ("device", "source", "metric"):
        values = stats.select(pl.col(name).drop_nulls().unique()).collect().to_series()
        out[name] = sorted(values.to_list())
    return out


# ---------------------------------------------------------------------------------------------
# collector health


def read_status(data_dir: Path) -> dict[str, Any] | None:
    """What ``collector status`` shows (status file + a fresh look at the spools), or None when
    no collector has ever run in ``data_dir``."""
    from collector.runtime.telemetry import read_status as runtime_status

    if not (data_dir / "status.json").exists() and not (data_dir / "spool").is_dir():
        return None
    try:
        return runtime_status(data_dir)
    except (OSError, ValueError):
        return None


def status_table(status: Mapping[str, Any]) -> pl.DataFrame:
    """One row per sink: backlog, delivered, dropped (by reason), dead-lettered, last error."""
    rows: list[dict[str, Any]] = []
    for name, info in sorted((status.get("sinks") or {}).items()):
        if not isinstance(info, Mapping):
            continue
        dropped = info.get("dropped_rows") or {}
        if not isinstance(dropped, Mapping):
            dropped = {"total": dropped}
        rows.append(
            {
                "sink": str(name),
                "backlog_files": _int(info.get("backlog_files")),
                "backlog_rows": _int(info.get("spool_backlog_rows")),
                "backlog_bytes": _int(info.get("backlog_bytes")),
                "oldest_age_s": _float(info.get("oldest_file_age_s")),
                "delivered_rows": _int(info.get("delivered_rows")),
                "dropped_rows": sum(_int(v) or 0 for v in dropped.values()),
                "dropped_by_reason": ", ".join(f"{k}: {_int(v)}" for k, v in dropped.items()),
                "dead_lettered_rows": _int(info.get("dead_lettered_rows")),
                "dead_letter_files": _int(info.get("dead_letter_files")),
                "last_success": _when(info.get("last_success")),
                "last_error": _str(info.get("last_error")),
            }
        )
    schema = {
        "sink": pl.String(),
        "backlog_files": pl.Int64(),
        "backlog_rows": pl.Int64(),
        "backlog_bytes": pl.Int64(),
        "oldest_age_s": pl.Float64(),
        "delivered_rows": pl.Int64(),
        "dropped_rows": pl.Int64(),
        "dropped_by_reason": pl.String(),
        "dead_lettered_rows": pl.Int64(),
        "dead_letter_files": pl.Int64(),
        "last_success": pl.Datetime("us", "UTC"),
        "last_error": pl.String(),
    }
    return pl.DataFrame(rows, schema=schema)


def health_view(table: pl.DataFrame) -> pl.DataFrame:
    """:func:`status_table` as the page shows it: seven short text columns that fit the page
    width (backlog, dropped and dead letters each in one cell), the last error in full."""

    def size(n: int | None) -> str:
        value = float(n or 0)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if value < 1024 or unit == "GiB":
                return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
            value /= 1024
        return ""

    def num(n: Any) -> str:
        return "-" if n is None else f"{n:,}"

    rows = []
    for r in table.iter_rows(named=True):
        backlog = f"{num(r['backlog_rows'])} rows, {num(r['backlog_files'])} files"
        if r["backlog_bytes"]:
            backlog += f", {size(r['backlog_bytes'])}"
        if r["oldest_age_s"] is not None:
            backlog += f", oldest {r['oldest_age_s']:,.0f} s"
        dropped = num(r["dropped_rows"])
        if r["dropped_by_reason"]:
            dropped += f" ({r['dropped_by_reason']})"
        dead = f"{num(r['dead_lettered_rows'])} rows"
        if r["dead_letter_files"] is not None:
            dead += f", {num(r['dead_letter_files'])} files"
        success = r["last_success"]
        rows.append(
            {
                "sink": r["sink"],
                "backlog": backlog,
                "delivered": num(r["delivered_rows"]),
                "dropped": dropped,
                "dead letters": dead,
                "last success (UTC)": "-" if success is None else f"{success:%Y-%m-%d %H:%M:%S}",
                "last error": r["last_error"] or "-",
            }
        )
    names = ("sink", "backlog", "delivered", "dropped", "dead letters", "last success (UTC)",
             "last error")  # fmt: skip
    return pl.DataFrame(rows, schema={n: pl.String() for n in names})


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _when(value: Any) -> datetime | None:
    """Epoch seconds (as the runtime writes) as a UTC datetime."""
    seconds = _float(value)
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return json.dumps(value)
    return str(value)


def scrape_metrics(url: str, *, timeout: float = 2.0) -> pl.DataFrame | None:
    """Samples of the collector's Prometheus endpoint (name, labels, value), None if down."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    rows = [
        {
            "name": sample.name,
            "labels": ", ".join(f"{k}={v}" for k, v in sorted(sample.labels.items())),
            "value": float(sample.value),
        }
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]
    return pl.DataFrame(
        rows, schema={"name": pl.String(), "labels": pl.String(), "value": pl.Float64()}
    )


# ---------------------------------------------------------------------------------------------
# thresholds from a file


def load_thresholds(path: Path | None) -> dict[str, Threshold]:
    """Per-metric thresholds from YAML/JSON ``{metric: {low: .., high: ..}}`` (also accepts
    ``min``/``max`` keys, or a bare number meaning ``high``)."""
    if path is None or not path.is_file():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    data = data.get("thresholds", data) if isinstance(data, dict) else {}
    out: dict[str, Threshold] = {}
    for metric, spec in data.items():
        if isinstance(spec, int | float):
            out[str(metric)] = Threshold(high=float(spec))
        elif isinstance(spec, Mapping):
            low = spec.get("low", spec.get("min"))
            high = spec.get("high", spec.get("max"))
            out[str(metric)] = Threshold(
                low=None if low is None else float(low),
                high=None if high is None else float(high),
            )
    return out


# ---------------------------------------------------------------------------------------------
# doubtful images (rows of an image model in `infer`)

IMAGE_ROWS_SCHEMA: dict[str, pl.DataType] = {
    "ts": pl.Datetime("us", "UTC"),
    "device": pl.String(),
    "prediction": pl.String(),
    "confidence": pl.Float64(),
    "path": pl.String(),
    "file": pl.String(),
    "blob_key": pl.String(),
}
THUMBNAIL = 96
"""Thumbnail edge in pixels: small pictures (an 8x8 digit) are enlarged to it, crisp."""
MAX_IMAGE_BYTES = 20 * 1024 * 1024


def has_images(lf: pl.LazyFrame, image_column: str = "path") -> bool:
    """True when the rows carry an image model's verdicts: a confidence and an image path."""
    names = set(lf.collect_schema().names())
    return {"confidence", image_column} <= names


def doubtful_images(
    lf: pl.LazyFrame,
    *,
    threshold: float = 0.6,
    image_column: str = "path",
    key_column: str = "blob_key",
    limit: int = 48,
) -> pl.DataFrame:
    """Image rows whose confidence is below ``threshold``, least sure first (then newest).

    An unreadable image has confidence 0 and no prediction: it comes first, which is what a
    reviewer wants. Returns ``IMAGE_ROWS_SCHEMA`` columns (``path`` renamed from
    ``image_column``; ``blob_key``, from ``key_column``, is the S3 object key the s3 sink
    uploaded the picture to, when the rows went through one), empty when the rows carry no
    image verdicts.
    """
    if not has_images(lf, image_column):
        return pl.DataFrame(schema=IMAGE_ROWS_SCHEMA)
    names = set(lf.collect_schema().names())

    def col(name: str, dtype: pl.DataType, source: str | None = None) -> pl.Expr:
        src = source or name
        return (pl.col(src).cast(dtype) if src in names else pl.lit(None, dtype)).alias(name)

    return (
        lf.select(
            col("ts", pl.Datetime("us", "UTC")),
            col("device", pl.String()),
            col("prediction", pl.String()),
            col("confidence", pl.Float64()),
            col("path", pl.String(), image_column),
            col("file", pl.String()),
            col("blob_key", pl.String(), key_column),
        )
        .filter(pl.col("path").is_not_null()
                & (pl.col("confidence").fill_null(0.0) < threshold))
        .sort([pl.col("confidence").fill_null(0.0), "ts"], descending=[False, True],
              nulls_last=True)
        .head(limit)
        .collect()
    )


def image_thumbnail(
    path: str | None, roots: Sequence[Path] | None = None, *, size: int = THUMBNAIL
) -> bytes | None:
    """A PNG thumbnail of the image at ``path`` when it is on this machine, else None.

    The path comes from the data (the blob store of the device that classified it), so it is
    read only under the dashboard's roots (:func:`allowed_roots`: the lake and the data dir,
    where the blob store lives), only up to ``MAX_IMAGE_BYTES``, and re-encoded through Pillow:
    the browser gets a known-good small PNG, never the stored bytes. A blob already deleted
    after its upload, or a row from another device, simply has no thumbnail.
    """
    if not path:
        return None
    try:
        confine(path, roots)
    except PathRefused:
        return None
    file = Path(path)
    try:
        if not file.is_absolute() or not file.is_file() or file.stat().st_size > MAX_IMAGE_BYTES:
            return None
    except OSError:
        return None
    try:
        raw = file.read_bytes()
    except OSError:
        return None
    return thumbnail_of(raw, size=size)


def thumbnail_of(raw: bytes, *, size: int = THUMBNAIL) -> bytes | None:
    """``raw`` image bytes as a small PNG (enlarged crisp when tiny), None when not an image."""
    import io
    import warnings

    from PIL import Image

    if len(raw) > MAX_IMAGE_BYTES:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                thumb = img.convert("RGB")
        small = max(thumb.width, thumb.height) < size
        scale = size / max(thumb.width, thumb.height)
        new = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
        thumb = thumb.resize(new, Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
        out = io.BytesIO()
        thumb.save(out, format="PNG")
    except Exception:  # whatever a damaged or hostile file makes Pillow raise: no thumbnail
        return None
    return out.getvalue()


def s3_image_thumbnail(
    root: str, key: str | None, endpoint_url: str | None = None, *, size: int = THUMBNAIL
) -> bytes | None:
    """A thumbnail of the picture the s3 sink uploaded (``blob_key``), read from S3.

    Only from the bucket of ``root`` (the S3 lake the page is reading, e.g.
    ``s3://bucket/retraining``): a key from the data cannot send the page to another bucket.
    Same S3 access as the lake listing (credentials chain, ``endpoint_url`` or
    ``AWS_ENDPOINT_URL``); at most ``MAX_IMAGE_BYTES`` are read. None when anything fails.
    """
    if not key or not root.startswith("s3://") or key.startswith("/") or ".." in key.split("/"):
        return None
    fs, base = lakequery._filesystem(root, endpoint_url)  # the lake's own S3 access
    bucket = base.split("/", 1)[0]
    try:
        with fs.open_input_stream(f"{bucket}/{key}") as stream:
            raw = stream.read(MAX_IMAGE_BYTES + 1)
    except Exception:  # missing object, access denied, network: the verdict shows alone
        return None
    return thumbnail_of(bytes(raw), size=size)
