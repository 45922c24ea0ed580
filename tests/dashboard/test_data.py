"""dashboards.data on generated lakes, checked against DuckDB / NumPy computing the same thing."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from collector.commands.export import LakeQuery, list_files
from dashboards import data

DAY2 = datetime(2024, 6, 2, tzinfo=UTC)
DAY3 = datetime(2024, 6, 3, tzinfo=UTC)


def duck(root: Path, sql: str) -> pl.DataFrame:
    """Run ``sql`` with ``lake`` bound to every Parquet file under ``root`` (union by name)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(
        f"CREATE VIEW lake AS SELECT * FROM read_parquet('{root}/**/*.parquet', "
        "union_by_name = true, hive_partitioning = false)"
    )
    return con.sql(sql).pl()


def stats_for(query: LakeQuery) -> pl.LazyFrame:
    return data.to_stats(data.lake_frame(query))


def test_scan_returns_exactly_the_rows_duckdb_selects(sample_lake: Path) -> None:
    query = LakeQuery(
        str(sample_lake),
        since=DAY2,
        until=DAY3,
        devices=("edge-02",),
        metrics=("temperature", "pressure"),
    )
    got = data.lake_frame(query).select("record_id", "metric", "mean").collect()
    want = duck(
        sample_lake,
        "SELECT record_id, metric, mean FROM lake WHERE ts >= TIMESTAMPTZ '2024-06-02 00:00:00Z' "
        "AND ts < TIMESTAMPTZ '2024-06-03 00:00:00Z' AND device = 'edge-02' "
        "AND metric IN ('temperature', 'pressure')",
    )
    assert got.height == 2 * 1440
    key = ["metric", "record_id"]
    assert got.sort(key).equals(want.sort(key))


def test_listing_prunes_to_the_partitions_of_the_query(sample_lake: Path) -> None:
    every = list_files(LakeQuery(str(sample_lake)))
    one_day = list_files(LakeQuery(str(sample_lake), since=DAY2, until=DAY3, metrics=("humidity",)))
    assert len(every) == 3 * 3 * 4  # metrics x days x 6-hour batches
    assert len(one_day) == 4
    assert {f.folder for f in one_day} == {"metric=humidity/date=2024-06-02"}


def test_mixed_lake_reads_raw_and_aggregates_as_one_frame(mixed_lake: Path) -> None:
    frame = data.lake_frame(LakeQuery(str(mixed_lake))).collect()
    assert {"value", "mean", "min", "max", "count", "site"} <= set(frame.columns)
    counts = dict(frame.group_by("metric").len().iter_rows())
    want = dict(duck(mixed_lake, "SELECT metric, count(*) FROM lake GROUP BY 1").iter_rows())
    assert counts == want
    # the unsafe metric name round-trips through its percent-encoded folder
    only = list_files(LakeQuery(str(mixed_lake), metrics=("air/quality",)))
    assert only and all(f.folder.startswith("metric=air%2Fquality/") for f in only)
    assert data.lake_frame(LakeQuery(str(mixed_lake), metrics=("air/quality",))).select(
        pl.col("metric").unique()
    ).collect().to_series().to_list() == ["air/quality"]


def test_raw_readings_count_as_windows_of_one(mixed_lake: Path) -> None:
    stats = stats_for(LakeQuery(str(mixed_lake), metrics=("voltage",))).collect()
    raw = data.lake_frame(LakeQuery(str(mixed_lake), metrics=("voltage",))).collect()
    assert stats.height == raw.height
    nulls = raw["value"].is_null()
    assert stats.filter(~nulls)["count"].unique().to_list() == [1]
    assert stats.filter(nulls)["count"].unique().to_list() == [0]
    assert (stats["mean"] == stats["min"]).fill_null(True).all()


@pytest.mark.parametrize("metric", ["temperature", "voltage"])
def test_auto_series_matches_an_independent_bucketing(mixed_lake: Path, metric: str) -> None:
    start, end = datetime(2024, 6, 1, tzinfo=UTC), datetime(2024, 6, 3, tzinfo=UTC)
    query = LakeQuery(str(mixed_lake), since=start, until=end, metrics=(metric,))
    rows, bucket = data.series(stats_for(query), start=start, end=end)
    assert bucket == timedelta(minutes=2)  # 2 days / 2000 points = 86 s, the next nice is 2m
    per_series = rows.group_by("device").len()["len"].max()
    assert per_series <= 2000
    us = int(bucket.total_seconds() * 1_000_000)
    if metric == "temperature":  # aggregates: count-weighted mean of means
        mean_sql = "sum(mean * count) / sum(count)"
        lo, hi, n = "min(min)", "max(max)", "sum(count)"
    else:  # raw readings: plain statistics of the values
        mean_sql, lo, hi, n = "avg(value)", "min(value)", "max(value)", "count(value)"
    want = duck(
        mixed_lake,
        f"SELECT device, epoch_us(ts) // {us} AS b, {mean_sql} AS mean, {lo} AS min, "
        f"{hi} AS max, {n} AS count FROM lake WHERE metric = '{metric}' "
        "AND ts >= TIMESTAMPTZ '2024-06-01 00:00:00Z' AND ts < TIMESTAMPTZ '2024-06-03 00:00:00Z' "
        "GROUP BY ALL ORDER BY device, b",
    )
    got = rows.with_columns((pl.col("ts").dt.epoch("us") // us).alias("b")).select(
        "device", "b", "mean", "min", "max", "count"
    )
    assert got.height == want.height
    assert got["device"].to_list() == want["device"].to_list()
    assert got["b"].to_list() == want["b"].to_list()
    assert got["count"].to_list() == [int(c) for c in want["count"].to_list()]
    np.testing.assert_allclose(got["mean"].to_numpy(), want["mean"].to_numpy(), rtol=1e-9)
    np.testing.assert_array_equal(got["min"].to_numpy(), want["min"].to_numpy())
    np.testing.assert_array_equal(got["max"].to_numpy(), want["max"].to_numpy())


def test_series_raw_and_combined_devices(sample_lake: Path) -> None:
    start, end = DAY2, DAY2 + timedelta(hours=1)
    query = LakeQuery(str(sample_lake), since=start, until=end, metrics=("humidity",))
    raw, bucket = data.series(stats_for(query), start=start, end=end, resolution="raw")
    assert bucket is None and raw.height == 3 * 60
    combined, bucket = data.series(
        stats_for(query), start=start, end=end, resolution=timedelta(minutes=10), by_device=False
    )
    assert bucket == timedelta(minutes=10)
    assert combined.height == 6 and combined["device"].unique().to_list() == ["all"]
    first = raw.filter(pl.col("ts") < start + timedelta(minutes=10))
    assert combined["max"][0] == first["max"].max()
    assert combined["count"][0] == first["count"].sum()


def test_choose_bucket_is_the_smallest_nice_bucket_that_fits() -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for span in (timedelta(hours=1), timedelta(days=1), timedelta(days=30), timedelta(days=400)):
        for series in (1, 3, 100):
            bucket = data.choose_bucket(start, start + span, series=series)
            points = span / bucket
            assert points <= min(2000, 40_000 // series)
            smaller = [b for b in data.NICE_BUCKETS if b < bucket]
            if smaller:
                assert span / smaller[-1] > min(2000, 40_000 // series)


def test_latest_and_change_agree_with_duckdb(sample_lake: Path) -> None:
    got = data.latest(stats_for(LakeQuery(str(sample_lake))))
    want = duck(
        sample_lake,
        "SELECT device, metric, arg_max(mean, ts) AS value, max(ts) AS ts, "
        "arg_max(mean, ts) - (SELECT l2.mean FROM lake l2 WHERE l2.device = lake.device "
        "AND l2.metric = lake.metric ORDER BY l2.ts DESC LIMIT 1 OFFSET 1) AS change "
        "FROM lake GROUP BY device, metric ORDER BY metric, device",
    )
    assert got.select("device", "metric", "value").equals(want.select("device", "metric", "value"))
    np.testing.assert_allclose(got["change"].to_numpy(), want["change"].to_numpy(), atol=1e-9)
    hourly = data.latest(stats_for(LakeQuery(str(sample_lake))), compare=timedelta(hours=1))
    row = hourly.filter((pl.col("device") == "edge-01") & (pl.col("metric") == "pressure"))
    ref = duck(
        sample_lake,
        "SELECT mean FROM lake WHERE device = 'edge-01' AND metric = "
        "'pressure' AND ts = TIMESTAMPTZ '2024-06-03 22:59:00Z'",
    )
    assert row["previous"][0] == ref["mean"][0]


def test_exceedances_list_every_window_beyond_its_threshold(sample_lake: Path) -> None:
    th = {"temperature": data.Threshold(high=30.0), "humidity": data.Threshold(low=35.0)}
    got = data.exceedances(stats_for(LakeQuery(str(sample_lake))), th)
    want = duck(
        sample_lake,
        "SELECT ts, device, metric FROM lake WHERE (metric = 'temperature' AND max > 30) "
        "OR (metric = 'humidity' AND min < 35)",
    )
    assert got.height == want.height > 0
    assert got["ts"].to_list() == sorted(got["ts"].to_list(), reverse=True)
    assert set(got.select("ts", "device", "metric").iter_rows()) == set(want.iter_rows())
    hot = got.filter(pl.col("kind") == "above")
    assert (hot["peak"] > 30).all() and (hot["threshold"] == 30).all()
    assert data.exceedances(stats_for(LakeQuery(str(sample_lake))), th, limit=3).height == 3


def test_histogram_matches_numpy(sample_lake: Path) -> None:
    stats = stats_for(LakeQuery(str(sample_lake), metrics=("pressure",)))
    got = data.histogram(stats, bins=20)
    means = stats.collect()["mean"].to_numpy()
    counts, edges = np.histogram(means, bins=20)
    dense = dict(zip(got["bin"].to_list(), got["count"].to_list(), strict=True))
    assert [dense.get(i, 0) for i in range(20)] == counts.tolist()
    np.testing.assert_allclose(got["start"].to_numpy(), edges[got["bin"].to_numpy()])


def test_freshness_finds_the_outage_of_edge_03(sample_lake: Path) -> None:
    now = datetime(2024, 6, 4, 1, 0, tzinfo=UTC)
    got = data.freshness(stats_for(LakeQuery(str(sample_lake))), now=now)
    rows = {r["device"]: r for r in got.iter_rows(named=True)}
    assert rows["edge-03"]["gaps"] == 1
    assert rows["edge-03"]["longest_gap"] == timedelta(hours=2, minutes=1)
    assert rows["edge-01"]["gaps"] == 0 and rows["edge-01"]["longest_gap"] is None
    assert rows["edge-01"]["last_ts"] == datetime(2024, 6, 3, 23, 59, tzinfo=UTC)
    assert rows["edge-01"]["age"] == timedelta(hours=1, minutes=1)
    assert rows["edge-03"]["timestamps"] == 3 * 1440 - 120
    fixed = data.freshness(stats_for(LakeQuery(str(sample_lake))), now=now, gap=timedelta(hours=3))
    assert fixed["gaps"].sum() == 0


def test_bounds_and_choices(mixed_lake: Path) -> None:
    stats = stats_for(LakeQuery(str(mixed_lake)))
    first, last = data.bounds(stats) or (None, None)
    want = duck(mixed_lake, "SELECT min(ts), max(ts) FROM lake").row(0)
    assert (first, last) == want
    assert data.choices(stats) == {
        "device": ["edge-01", "edge-02", "edge-03", "edge-09"],
        "source": ["meter", "room"],
        "metric": ["air/quality", "humidity", "temperature", "voltage"],
    }


def _spool_file(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as f, ipc.new_stream(f, table.schema) as w:
        w.write_table(table)


def test_spool_rows_are_read_and_filtered(tmp_path: Path, sample_lake: Path) -> None:
    rows = data.lake_frame(
        LakeQuery(str(sample_lake), since=DAY2, until=DAY2 + timedelta(minutes=30))
    ).collect()
    folder = tmp_path / "spool" / "cloud"
    (folder / "inflight").mkdir(parents=True)
    (folder / "dead-letter").mkdir()
    half = rows.height // 2
    _spool_file(folder / "b-0001.arrow", rows.head(half).to_arrow())
    _spool_file(folder / "inflight" / "b-0000.arrow", rows.tail(rows.height - half).to_arrow())
    (folder / "b-0002.arrow").write_bytes(b"ARROW1 cut short")  # a crash mid-write
    assert data.spool_sinks(tmp_path) == ["cloud"]
    paths = data.spool_paths(tmp_path, "cloud")
    assert [p.name for p in paths] == ["b-0001.arrow", "b-0002.arrow", "b-0000.arrow"]
    query = LakeQuery(str(tmp_path / "spool"), devices=("edge-01",), where="max > mean")
    got = data.spool_frame(query, paths).collect()
    want = rows.filter((pl.col("device") == "edge-01") & (pl.col("max") > pl.col("mean")))
    assert sorted(got["record_id"].to_list()) == sorted(want["record_id"].to_list())
    assert got.height == 3 * 30
    assert data.spool_paths(tmp_path, "cloud", inflight=False)[-1].name == "b-0002.arrow"


def test_status_table_reads_what_the_runtime_writes(tmp_path: Path) -> None:
    assert data.read_status(tmp_path) is None
    (tmp_path / "spool" / "lake" / "inflight").mkdir(parents=True)
    (tmp_path / "spool" / "lake" / "dead-letter").mkdir()
    (tmp_path / "spool" / "lake" / "dead-letter" / "x.parquet").write_bytes(b"x")
    (tmp_path / "status.json").write_text(
        '{"pid": 1, "running": false, "updated_at": 1717200000.0, "sinks": {"lake": '
        '{"delivered_rows": 10, "dropped_rows": {"spool_full": 4, "ttl": 1}, '
        '"dead_lettered_rows": 2, "last_success": 1717200000.0, "last_error": "boom", '
        '"spool_backlog_rows": 7}}}'
    )
    status = data.read_status(tmp_path)
    assert status is not None
    table = data.status_table(status).row(0, named=True)
    assert table["sink"] == "lake"
    assert table["dropped_rows"] == 5
    assert table["dead_lettered_rows"] == 2 and table["dead_letter_files"] == 1
    assert table["backlog_files"] == 0 and table["backlog_rows"] == 7
    assert table["last_error"] == "boom"
    assert table["last_success"] == datetime(2024, 6, 1, tzinfo=UTC)


def test_scrape_metrics_parses_prometheus_text() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = (
        b"# TYPE edge_collector_dropped_rows counter\n"
        b'edge_collector_dropped_rows_total{reason="spool_full",sink="s3"} 4.0\n'
        b"# TYPE edge_collector_spool_rows gauge\n"
        b'edge_collector_spool_rows{sink="s3"} 120.0\n'
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        got = data.scrape_metrics(url)
    finally:
        server.shutdown()
        server.server_close()
    assert got is not None
    values = {(r["name"], r["labels"]): r["value"] for r in got.iter_rows(named=True)}
    assert values[("edge_collector_dropped_rows_total", "reason=spool_full, sink=s3")] == 4.0
    assert values[("edge_collector_spool_rows", "sink=s3")] == 120.0
    assert (
        data.scrape_metrics(f"http://127.0.0.1:{server.server_address[1]}/x", timeout=0.5) is None
    )


def test_thresholds_file(tmp_path: Path) -> None:
    path = tmp_path / "th.yaml"
    path.write_text(
        "thresholds:\n  temperature: {max: 28}\n  humidity: {low: 20, high: 80}\n  pressure: 1030\n"
    )
    th = data.load_thresholds(path)
    assert th == {
        "temperature": data.Threshold(high=28.0),
        "humidity": data.Threshold(low=20.0, high=80.0),
        "pressure": data.Threshold(high=1030.0),
    }
    assert data.load_thresholds(tmp_path / "missing.yaml") == {}


def test_default_lake_prefers_data_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.LAKE_ENV, raising=False)
    assert data.default_lake(tmp_path) == str(data.SAMPLE_LAKE)
    (tmp_path / "data" / "lake").mkdir(parents=True)
    assert data.default_lake(tmp_path) == str(tmp_path / "data" / "lake")
    monkeypatch.setenv(data.LAKE_ENV, "s3://bucket/lake")
    assert data.default_lake(tmp_path) == "s3://bucket/lake"


def test_committed_sample_lake_is_what_the_generator_makes(sample_lake: Path) -> None:
    committed = data.SAMPLE_LAKE
    assert committed.is_dir(), "run `make sample-lake`"
    mine = sorted(p.relative_to(sample_lake) for p in sample_lake.rglob("*.parquet"))
    theirs = sorted(p.relative_to(committed) for p in committed.rglob("*.parquet"))
    assert mine == theirs
    a = data.lake_frame(LakeQuery(str(sample_lake))).collect().sort("record_id", "metric")
    b = data.lake_frame(LakeQuery(str(committed))).collect().sort("record_id", "metric")
    assert a.equals(b)
    assert sum(p.stat().st_size for p in committed.rglob("*")) < 2_000_000
    assert not math.isnan(a["mean"].mean() or math.nan)


# ---------------------------------------------------------------------------------------------
# issue 17 item 13: freshness against now, resolution never finer than the data, axis labels


def test_freshness_age_is_measured_against_now_not_the_newest_reading(sample_lake: Path) -> None:
    stats = stats_for(LakeQuery(str(sample_lake), since=DAY3))
    last = datetime(2024, 6, 3, 23, 59, tzinfo=UTC)
    now = last + timedelta(minutes=20)  # every collector stopped 20 minutes ago
    fresh = data.freshness(stats, now=now)
    assert fresh["age"].to_list() == [timedelta(minutes=20)] * 3
    later = data.with_age(data.freshness(stats), now + timedelta(hours=1))
    assert later["age"].to_list() == [timedelta(minutes=80)] * 3


@pytest.mark.parametrize(
    ("span", "want"),
    [(timedelta(hours=1), timedelta(minutes=1)), (timedelta(minutes=10), timedelta(minutes=1)),
     (timedelta(days=3), timedelta(minutes=5))],
)
def test_resolution_is_never_finer_than_the_data(
    sample_lake: Path, span: timedelta, want: timedelta
) -> None:
    end = datetime(2024, 6, 4, tzinfo=UTC)
    query = LakeQuery(str(sample_lake), since=end - span, until=end, metrics=("pressure",))
    stats = stats_for(query)
    rows, bucket = data.series(stats, start=end - span, end=end)
    assert bucket == want
    assert data.format_bucket(bucket) == ("1m" if want == timedelta(minutes=1) else "5m")
    if want == timedelta(minutes=1):  # as stored: one row per stored row, nothing merged
        assert rows.height == stats.select(pl.len()).collect().item()
        assert rows["count"].to_list() == stats.collect().sort("device", "ts")["count"].to_list()
    assert data.native_step(stats) == timedelta(minutes=1)


@pytest.mark.parametrize(
    ("start", "span"),
    [
        (datetime(2024, 6, 3, 12, 0, 3, tzinfo=UTC), timedelta(minutes=4)),
        (datetime(2024, 6, 3, 12, 0, tzinfo=UTC), timedelta(seconds=20)),
        (datetime(2024, 6, 3, tzinfo=UTC), timedelta(days=1)),
        (datetime(2024, 6, 3, 23, 30, tzinfo=UTC), timedelta(hours=1)),
        (datetime(2023, 12, 31, 18, tzinfo=UTC), timedelta(hours=9)),
        (datetime(2024, 6, 1, tzinfo=UTC), timedelta(days=3)),
        (datetime(2024, 5, 1, tzinfo=UTC), timedelta(days=45)),
        (datetime(2020, 5, 1, tzinfo=UTC), timedelta(days=1500)),
    ],
)
def test_time_axis_labels_never_repeat(start: datetime, span: timedelta) -> None:
    ticks, fmt = data.time_axis(start, start + span)
    labels = [t.strftime(fmt) for t in ticks]
    assert 2 <= len(labels) <= 8
    assert len(set(labels)) == len(labels), labels
    assert all(start <= t <= start + span for t in ticks)
    assert ticks == sorted(ticks)


def test_data_dir_goes_with_its_lake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = tmp_path / "data"
    (started / "lake").mkdir(parents=True)
    other = tmp_path / "data" / "fleet" / "edge-02"
    (other / "lake").mkdir(parents=True)
    (other / "status.json").write_text("{}")
    monkeypatch.setenv(data.LAKE_ENV, str(started / "lake"))
    monkeypatch.setenv(data.DATA_DIR_ENV, str(started))
    assert data.data_dir_for(str(started / "lake")) == started
    assert data.data_dir_for(str(other / "lake")) == other
    assert data.data_dir_for(str(data.SAMPLE_LAKE)) is None  # no collector wrote it
    assert data.data_dir_for("s3://bucket/lake") == started


def test_health_view_keeps_every_field_in_seven_columns() -> None:
    error = "AccessDenied: " + "x" * 300
    table = data.status_table(
        {"sinks": {"cloud": {"delivered_rows": 1234, "dropped_rows": {"ttl": 2},
                             "dead_lettered_rows": 1, "spool_backlog_rows": 9,
                             "backlog_files": 2, "backlog_bytes": 3 * 1024 * 1024,
                             "oldest_file_age_s": 61.0, "last_error": error}}}
    )
    view = data.health_view(table)
    assert view.columns == ["sink", "backlog", "delivered", "dropped", "dead letters",
                            "last success (UTC)", "last error"]
    row = view.row(0, named=True)
    assert row["backlog"] == "9 rows, 2 files, 3.0 MiB, oldest 61 s"
    assert row["delivered"] == "1,234" and row["dropped"] == "2 (ttl: 2)"
    assert row["last error"] == error  # in full
