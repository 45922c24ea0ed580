"""Streamlit page over the collector's lake: ``streamlit run dashboards/app.py``.

Only layout lives here; every number comes from :mod:`dashboards.data`, which is tested without
Streamlit. Results are cached with ``st.cache_data`` keyed on the query and the lake listing
(path, size, mtime of each file), so a refresh re-reads only when a new batch has landed.

The lake can be given as ``?lake=…`` in the URL or ``$EDGE_COLLECTOR_LAKE``; the default is
``./data/lake`` if a collector wrote one, else the sample lake. Whoever reaches the page can type
paths and SQL into it, so a local path (typed, or in the URL) is read only under the lake and
data dir the dashboard was started with (:func:`dashboards.data.confine`), and the row filter
passes the collector's SQL gate. `.streamlit/config.toml` binds the server to 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl
import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run dashboards/app.py` puts only dashboards/ on it
    sys.path.insert(0, str(ROOT))

from collector.commands.export import export  # noqa: E402
from collector.lakequery import LakeFile, LakeQuery, listing_key  # noqa: E402
from dashboards import data  # noqa: E402

PRESETS: dict[str, timedelta | None] = {
    "Last hour": timedelta(hours=1),
    "Last 6 hours": timedelta(hours=6),
    "Last 24 hours": timedelta(hours=24),
    "Last 7 days": timedelta(days=7),
    "Last 30 days": timedelta(days=30),
    "All": None,
}
RESOLUTIONS: dict[str, str | timedelta] = {
    "auto": "auto",
    "raw": "raw",
    "1 minute": timedelta(minutes=1),
    "5 minutes": timedelta(minutes=5),
    "15 minutes": timedelta(minutes=15),
    "1 hour": timedelta(hours=1),
    "1 day": timedelta(days=1),
}
MAX_TILES = 6
IMAGE_TILES = 48
IMAGE_COLUMNS = 8

# ---------------------------------------------------------------------------------------------
# cached queries (keys: the query, the listing)


def _listing(query: LakeQuery) -> tuple[LakeFile, ...]:
    """A local listing is a few ``scandir`` calls: always fresh. S3 listing costs requests, so it
    is reused for a few seconds."""
    if query.root.startswith("s3://"):
        return _remote_listing(query)
    return tuple(data.lake_files(query))


@st.cache_data(ttl=5, show_spinner=False, max_entries=16)
def _remote_listing(query: LakeQuery) -> tuple[LakeFile, ...]:
    return tuple(data.lake_files(query))


def _frame(query: LakeQuery, files: Sequence[LakeFile] | None) -> pl.LazyFrame:
    return data.to_stats(data.lake_frame(query, files))


@st.cache_data(show_spinner=False, max_entries=32)
def _bounds(
    query: LakeQuery,
    key: tuple[Any, ...],
    files: tuple[LakeFile, ...],
) -> tuple[datetime, datetime] | None:
    return data.bounds(_frame(query, _edge_partitions(files)))


def _edge_partitions(files: tuple[LakeFile, ...]) -> tuple[LakeFile, ...]:
    """Files of the first and last date partitions: enough to find the time bounds cheaply."""
    dates = {dict(f.partition).get("date") for f in files}
    if None in dates or not dates:
        return files
    edge = {min(dates), max(dates)}  # type: ignore[type-var]
    return tuple(f for f in files if dict(f.partition).get("date") in edge)


@st.cache_data(show_spinner=False, max_entries=32)
def _choices(
    query: LakeQuery,
    key: tuple[Any, ...],
    files: tuple[LakeFile, ...],
) -> dict[str, list[str]]:
    return data.choices(_frame(query, files))


@st.cache_data(show_spinner="Querying…", max_entries=32)
def _view(
    query: LakeQuery,
    key: tuple[Any, ...],
    files: tuple[LakeFile, ...],
    start: datetime,
    end: datetime,
    resolution: str | timedelta,
    by_device: bool,
    thresholds: tuple[tuple[str, data.Threshold], ...],
) -> dict[str, Any]:
    stats = _frame(query, files).cache()
    rows, bucket = data.series(
        stats,
        start=start,
        end=end,
        resolution=resolution,  # type: ignore[arg-type]
        by_device=by_device,
    )
    return {
        "series": rows,
        "bucket": bucket,
        "latest": data.latest(stats, compare=None),
        "exceedances": data.exceedances(stats, dict(thresholds), limit=500),
        "histogram": data.histogram(stats),
        "freshness": data.freshness(stats),  # the age is taken at display time
        "rows": stats.select(pl.len()).collect().item(),
    }


# ---------------------------------------------------------------------------------------------
# sidebar


def _sidebar_source() -> tuple[str, LakeQuery, Path | None]:
    """The data source picked in the sidebar and the collector data dir whose health and spool
    go with it (None when the lake belongs to no collector here, e.g. the sample lake);
    PathRefused when a path is outside the roots."""
    params = st.query_params
    side = st.sidebar
    side.header("Data source")
    kinds = ["Local lake", "S3 lake", "Spool (not yet uploaded)"]
    lake_default = params.get("lake") or data.default_lake()
    kind = side.radio(
        "Read from", kinds, index=1 if lake_default.startswith("s3://") else 0, key="source_kind"
    )
    if kind == "Local lake":
        path = side.text_input(
            "Lake path",
            lake_default if not lake_default.startswith("s3://") else str(data.SAMPLE_LAKE),
            key="lake_path",
            help="A folder under the lake or data dir the dashboard was started with.",
        )
        query = LakeQuery(root=data.confine(path))
        return "lake", query, _sidebar_data_dir(data.data_dir_for(query.root), query.root)
    if kind == "S3 lake":
        uri = side.text_input(
            "S3 lake",
            lake_default if lake_default.startswith("s3://") else "s3://bucket/lake",
            key="s3_uri",
        )
        endpoint = side.text_input(
            "Endpoint URL (optional)",
            os.environ.get("AWS_ENDPOINT_URL", ""),
            key="s3_endpoint",
            help="Credentials come from the standard AWS chain (env, profile, instance role).",
        )
        query = LakeQuery(root=uri, endpoint_url=endpoint or None)
        return "lake", query, _sidebar_data_dir(data.data_dir_for(uri), uri)
    data_dir = _sidebar_data_dir(data.default_data_dir(), "spool")
    return "spool", LakeQuery(root=str((data_dir or Path(".")) / "spool")), data_dir


def _sidebar_data_dir(default: Path | None, source: str) -> Path | None:
    """The collector data dir field. It follows the source: picking another lake resets it to
    that lake's data dir (empty when it has none), so the health panel never describes a
    collector unrelated to the rows on the page."""
    if st.session_state.get("_data_dir_for") != source:
        st.session_state["data_dir"] = "" if default is None else str(default)
        st.session_state["_data_dir_for"] = source
    text = st.sidebar.text_input(
        "Collector data dir",
        key="data_dir",
        help="Holds spool/ and status.json; empty: no collector goes with this lake.",
    ).strip()
    return Path(data.confine(text)) if text else None


def _sidebar_time(bounds: tuple[datetime, datetime]) -> tuple[datetime, datetime]:
    side = st.sidebar
    side.header("Time range")
    first, last = bounds
    preset = side.selectbox(
        "Range",
        [*PRESETS, "Custom"],
        index=2,
        key="preset",
        help="Presets end at the latest reading in the source.",
    )
    if preset != "Custom":
        span = PRESETS[preset]
        end = last + timedelta(microseconds=1)
        return (first if span is None else max(first, end - span)), end
    days = side.date_input(
        "Dates (UTC)",
        (last.date() - timedelta(days=1), last.date()),
        min_value=first.date(),
        max_value=last.date(),
        key="custom_dates",
    )
    start_d, end_d = (
        days
        if isinstance(days, tuple) and len(days) == 2
        else (days[0] if isinstance(days, tuple) else days,) * 2
    )
    t0 = side.time_input("From (UTC)", time(0, 0), key="custom_from")
    t1 = side.time_input("To (UTC)", time(23, 59), key="custom_to")
    start = datetime.combine(start_d, t0, tzinfo=UTC)
    end = datetime.combine(end_d, t1, tzinfo=UTC) + timedelta(minutes=1)
    return start, end


def _sidebar_filters(options: dict[str, list[str]], source: str) -> dict[str, list[str]]:
    """Device/source/metric pickers; all selected by default, and an empty pick means all.

    Picks are reset when the data source changes, since the old values mean nothing there.
    """
    side = st.sidebar
    side.header("Filters")
    if st.session_state.get("_filters_for") != source:
        for name in options:
            st.session_state.pop(f"filter_{name}", None)
        st.session_state["_filters_for"] = source
    chosen: dict[str, list[str]] = {}
    for name, label in (("device", "Devices"), ("source", "Sources"), ("metric", "Metrics")):
        picked = side.multiselect(label, options[name], default=options[name], key=f"filter_{name}")
        chosen[name] = [p for p in picked if p in options[name]] or options[name]
    return chosen


def _sidebar_thresholds(metrics: Sequence[str]) -> dict[str, data.Threshold]:
    file = os.environ.get(data.THRESHOLDS_ENV)
    defaults = data.load_thresholds(Path(file) if file else None)
    out: dict[str, data.Threshold] = {}
    with st.sidebar.expander("Thresholds", expanded=False):
        if file:
            st.caption(f"Defaults from {file}")
        for metric in metrics:
            d = defaults.get(metric, data.Threshold())
            cols = st.columns(2)
            low = cols[0].number_input(f"{metric} low", value=d.low, key=f"th_low_{metric}")
            high = cols[1].number_input(f"{metric} high", value=d.high, key=f"th_high_{metric}")
            if low is not None or high is not None:
                out[metric] = data.Threshold(
                    low=None if low is None else float(low),
                    high=None if high is None else float(high),
                )
    return out


# ---------------------------------------------------------------------------------------------
# main area


def _chart(
    rows: pl.DataFrame, metric: str, unit: str | None, start: datetime, end: datetime
) -> alt.LayerChart:
    frame = rows.select("ts", "device", "mean", "min", "max", "count")
    title = f"{metric} ({unit})" if unit else metric
    first, last = rows["ts"].min(), rows["ts"].max()
    ticks, fmt = data.time_axis(
        max(start, first) if isinstance(first, datetime) else start,
        min(end, last) if isinstance(last, datetime) else end,
    )
    base = alt.Chart(frame).encode(
        x=alt.X(
            "ts:T",
            title=None,
            scale=alt.Scale(type="utc"),
            axis=alt.Axis(
                values=[t.isoformat() for t in ticks],  # Vega drops an axis of epoch ms
                format=fmt,
                labelOverlap=True,
            ),
        ),
        color=alt.Color("device:N", title="device"),
    )
    band = base.mark_area(opacity=0.2).encode(y=alt.Y("min:Q", title=title), y2="max:Q")
    line = base.mark_line(strokeWidth=1.5).encode(
        y=alt.Y("mean:Q", title=title, scale=alt.Scale(zero=False)),
        tooltip=[
            alt.Tooltip("ts:T", format="%Y-%m-%d %H:%M:%S"),
            "device:N",
            alt.Tooltip("mean:Q", format=".2f"),
            alt.Tooltip("min:Q", format=".2f"),
            alt.Tooltip("max:Q", format=".2f"),
            "count:Q",
        ],
    )
    return alt.layer(band, line).properties(height=260)


def _histogram_chart(hist: pl.DataFrame, metric: str) -> alt.Chart:
    return (
        alt.Chart(hist.select("start", "end", "count"))
        .mark_bar()
        .encode(
            x=alt.X("start:Q", title=metric, bin="binned"),
            x2="end:Q",
            y=alt.Y("count:Q", title="rows"),
        )
        .properties(height=200)
    )


def _fmt(value: float | None, unit: str | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.2f} {unit}".strip() if unit else f"{value:,.2f}"


def _tiles(latest: pl.DataFrame) -> None:
    rows = latest.head(MAX_TILES).to_dicts()
    if not rows:
        return
    cols = st.columns(len(rows))
    for col, row in zip(cols, rows, strict=True):
        change = row["change"]
        col.metric(
            row["device"],
            _fmt(row["value"], row["unit"]),
            delta=None if change is None else f"{change:+.2f}",
            help=f"latest at {row['ts']:%Y-%m-%d %H:%M:%S} UTC; change since the previous row",
            border=True,
        )
    if latest.height > MAX_TILES:
        st.caption(f"{latest.height - MAX_TILES} more devices in the freshness table")


def _metric_section(metric: str, view: dict[str, Any], start: datetime, end: datetime) -> None:
    latest = view["latest"].filter(pl.col("metric") == metric)
    unit = next((u for u in latest["unit"].to_list() if u), None)
    st.subheader(metric)
    _tiles(latest)
    rows = view["series"].filter(pl.col("metric") == metric)
    if rows.is_empty():
        st.info(f"No {metric} rows in this range.")
        return
    if rows["count"].sum() == 0:  # e.g. `image` rows: verdicts, no value to draw
        st.caption(f"{metric} rows carry no numeric value to chart.")
        return
    st.altair_chart(
        _chart(rows, metric, unit, start, end), width="stretch", key=f"chart_{metric}"
    )
    left, right = st.columns([2, 3])
    with left:
        hist = view["histogram"].filter(pl.col("metric") == metric)
        st.altair_chart(_histogram_chart(hist, metric), width="stretch", key=f"hist_{metric}")
    with right:
        exc = view["exceedances"].filter(pl.col("metric") == metric)
        st.markdown(f"**Threshold exceedances** ({exc.height})")
        if exc.is_empty():
            st.caption("None in this range (set thresholds in the sidebar).")
        else:
            st.dataframe(exc.drop("metric"), hide_index=True, height=200, key=f"exceed_{metric}")


@st.cache_data(show_spinner=False, max_entries=32)
def _doubtful(
    query: LakeQuery, key: tuple[Any, ...], files: tuple[LakeFile, ...], threshold: float
) -> pl.DataFrame | None:
    lf = data.lake_frame(query, files)
    if not data.has_images(lf):
        return None
    return data.doubtful_images(lf, threshold=threshold, limit=IMAGE_TILES)


@st.cache_data(show_spinner=False, max_entries=512)
def _thumbnail(path: str | None, stamp: tuple[int, int] | None) -> bytes | None:
    """Keyed on the file's (mtime, size) too, so a replaced blob is re-read."""
    return data.image_thumbnail(path)


@st.cache_data(show_spinner=False, max_entries=512, ttl=600)
def _s3_thumbnail(root: str, endpoint_url: str | None, key: str) -> bytes | None:
    return data.s3_image_thumbnail(root, key, endpoint_url)


def _stamp(path: str | None) -> tuple[int, int] | None:
    try:
        stat = Path(path).stat() if path else None
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size) if stat else None


def _doubtful_images(query: LakeQuery, key: tuple[Any, ...], files: tuple[LakeFile, ...]) -> None:
    """Thumbnails of the images an `infer` image model was least sure about, for review.

    Shown only when the rows carry image verdicts (`confidence` and `path`). The picture comes
    from the row's `path` when that file is on this machine (the device's blob store), else,
    on an S3 lake, from the object the s3 sink uploaded it to (`blob_key`, same bucket); rows
    with neither show their verdict only.
    """
    threshold = float(st.session_state.get("doubt_threshold", 0.6))
    try:
        rows = _doubtful(query, key, files, threshold)
    except (pl.exceptions.PolarsError, ValueError):
        return
    if rows is None:
        return
    st.subheader("Doubtful images")
    st.slider("Confidence below", min_value=0.05, max_value=1.0, value=0.6, step=0.05,
              key="doubt_threshold")
    if rows.is_empty():
        st.info(f"No image in this range was classified with confidence below {threshold:.2f}.")
        return
    st.caption(f"{rows.height} least confident image(s) below {threshold:.2f}, least sure first.")
    grid = st.columns(IMAGE_COLUMNS)
    for i, row in enumerate(rows.iter_rows(named=True)):
        label = row["prediction"] if row["prediction"] is not None else "unreadable"
        caption = f"{label} · {row['confidence'] or 0:.2f}"
        with grid[i % IMAGE_COLUMNS]:
            stamp = _stamp(row["path"])
            thumb = _thumbnail(row["path"], stamp) if stamp is not None else None
            remote = bool(row["blob_key"]) and query.root.startswith("s3://")
            if thumb is None and remote:
                thumb = _s3_thumbnail(query.root, query.endpoint_url, row["blob_key"])
            if thumb is not None:
                st.image(thumb, caption=caption)
            else:
                why = "cannot be shown" if stamp is not None or remote else "not on this machine"
                st.markdown(f"**{caption}**")
                st.caption(f"{row['file'] or row['path']}: image {why}")


def _freshness(view: dict[str, Any], now: datetime) -> None:
    st.subheader("Data freshness")
    fresh = (
        data.with_age(view["freshness"], now)
        .with_columns(
            (pl.col("age").dt.total_seconds() / 60).round(1).alias("age_min"),
            (pl.col("typical_step").dt.total_seconds()).alias("step_s"),
            (pl.col("longest_gap").dt.total_seconds() / 60).round(1).alias("longest_gap_min"),
        )
        .select("device", "last_ts", "age_min", "timestamps", "step_s", "gaps", "longest_gap_min")
    )
    st.caption(
        f"Age of each device's last reading at {now:%Y-%m-%d %H:%M:%S} UTC (now). A gap is a "
        "step over 3 times the device's usual step."
    )
    st.dataframe(fresh, hide_index=True, key="freshness")


def _health(data_dir: Path | None) -> None:
    st.subheader("Collector health")
    if data_dir is None:
        st.info(
            "No collector data dir goes with this lake (it is not `<data dir>/lake` of a "
            "collector here): enter one in the sidebar to see its backlog, drops and errors."
        )
        return
    status = data.read_status(data_dir)
    if status is None:
        st.info(
            f"No {data_dir / 'status.json'} yet: start `collector run` to see backlog, "
            "drops and errors per sink."
        )
    else:
        updated = status.get("updated_at")
        when = "never"
        if updated:
            when = f"{datetime.fromtimestamp(updated, UTC):%Y-%m-%d %H:%M:%S} UTC"
        st.caption(
            f"Collector in {data_dir} {'running' if status.get('alive') else 'not running'}; "
            f"status written {when}."
        )
        # a static table: every sink and every column on the page, long errors wrapped
        st.table(data.health_view(data.status_table(status)).to_pandas().set_index("sink"))
    url = os.environ.get(data.METRICS_URL_ENV, data.DEFAULT_METRICS_URL)
    if st.toggle("Scrape the metrics endpoint", value=False, key="scrape", help=url):
        samples = data.scrape_metrics(url)
        if samples is None:
            st.info(f"{url} is not answering (is the collector running?).")
        else:
            st.dataframe(samples, hide_index=True, key="prom")


def _downloads(query: LakeQuery, files: Sequence[LakeFile]) -> None:
    st.subheader("Download")
    st.caption("The filtered rows, produced by the same code as `collector export`.")
    cols = st.columns(2)
    for col, suffix in zip(cols, (".parquet", ".csv"), strict=True):
        col.download_button(
            f"Download {suffix[1:].upper()}",
            data=_export_callable(query, files, suffix),
            file_name=f"export{suffix}",
            mime="application/octet-stream" if suffix == ".parquet" else "text/csv",
            key=f"dl{suffix}",
        )


def _export_callable(
    query: LakeQuery, files: Sequence[LakeFile], suffix: str
) -> Callable[[], bytes]:
    def produce() -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"export{suffix}"
            export(query, out, files=files)  # a lake or a spool: the same export
            return out.read_bytes()

    return produce


# ---------------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="edge-collector", layout="wide")
    st.title("edge-collector")
    try:
        kind, base, data_dir = _sidebar_source()
    except data.PathRefused as exc:
        st.error(f"Refused: {exc}")
        return

    if kind == "spool":
        if data_dir is None:
            st.info("Enter the collector data dir in the sidebar to read its spool.")
            return
        sinks = data.spool_sinks(data_dir)
        if not sinks:
            st.info(f"No spool under {data_dir / 'spool'}: nothing is waiting for upload.")
            _health(data_dir)
            return
        sink = st.sidebar.selectbox("Sink", sinks, key="spool_sink")
        base = LakeQuery(root=str(data.spool_root(data_dir, sink)))
    try:
        all_files = _listing(base)
    except (FileNotFoundError, OSError) as exc:
        st.warning(f"Cannot read {base.root}: {exc}")
        _health(data_dir)
        return
    key = listing_key(all_files)
    if not key:
        st.info("The source holds no data yet.")
        _health(data_dir)
        return
    lake_bounds = _bounds(base, key, all_files)
    if lake_bounds is None:
        st.info("The source holds no rows yet.")
        _health(data_dir)
        return
    start, end = _sidebar_time(lake_bounds)
    ranged = LakeQuery(root=base.root, endpoint_url=base.endpoint_url, since=start, until=end)
    ranged_files = _listing(ranged)
    options = _choices(ranged, key, ranged_files)
    chosen = _sidebar_filters(options, f"{kind}:{base.root}")
    st.sidebar.header("Display")
    resolution = RESOLUTIONS[
        st.sidebar.selectbox("Resolution", list(RESOLUTIONS), key="resolution")
    ]
    by_device = not st.sidebar.toggle(
        "Combine devices", value=len(chosen["device"]) > 8, key="combine"
    )
    thresholds = _sidebar_thresholds(chosen["metric"])
    refresh = st.sidebar.toggle("Auto-refresh", value=False, key="autorefresh")
    every = st.sidebar.number_input(
        "Every (s)", min_value=2, value=10, key="refresh_every", disabled=not refresh
    )
    where = st.sidebar.text_input(
        "Row filter (SQL)",
        key="where",
        placeholder="max > 28",
        help="A Polars SQL condition on the stored columns, as `collector export --where`.",
    )
    fields: dict[str, Any] = {
        "root": base.root,
        "endpoint_url": base.endpoint_url,
        "since": start,
        "until": end,
        "devices": tuple(chosen["device"]),
        "sources": tuple(chosen["source"]),
        "metrics": tuple(chosen["metric"]),
    }
    try:
        query = LakeQuery(**fields, where=where.strip() or None)
    except ValueError as exc:
        st.sidebar.error(str(exc))
        query = LakeQuery(**fields)

    files = _listing(query)
    try:
        view = _view(
            query,
            key,
            tuple(files),
            start,
            end,
            resolution,
            by_device,
            tuple(sorted(thresholds.items())),
        )
    except (pl.exceptions.PolarsError, ValueError) as exc:  # e.g. a filter's missing column
        st.error(f"The query failed: {str(exc).splitlines()[0]}")
        _health(data_dir)
        return
    st.caption(
        f"{base.root} · {start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC · "
        f"{view['rows']:,} rows from {len(files)} files"
        f" · resolution {data.format_bucket(view['bucket'])}"
    )
    _doubtful_images(query, key, tuple(files))
    for metric in chosen["metric"]:
        _metric_section(metric, view, start, end)
    _freshness(view, datetime.now(UTC))
    _downloads(query, files)
    _health(data_dir)
    if refresh:
        _watch(base, key, float(every))


def _watch(base: LakeQuery, key: tuple[Any, ...], every: float) -> None:
    """Re-run the page when the source (lake or spool) changed: a cheap listing every
    ``every`` seconds."""

    @st.fragment(run_every=timedelta(seconds=every))
    def watch() -> None:
        try:
            current = listing_key(data.lake_files(base))
        except OSError:
            current = ()
        if current != key:
            st.rerun(scope="app")

    watch()


main()
