"""collector.commands.export: time arguments, partition pruning, the files export writes."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collector.commands.export import (
    LakeQuery,
    export,
    list_files,
    parse_time,
    run_export,
    scan_lake,
)
from sample_data.make_lake import aggregate_table, write_lake
from sinks._partition import split

NOW = datetime(2024, 6, 5, 12, 30, 15, tzinfo=UTC)
DAY2 = datetime(2024, 6, 2, tzinfo=UTC)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export") / "lake"
    write_lake(aggregate_table(days=3), root)
    return root


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("now", NOW),
        ("NOW", NOW),
        ("today", datetime(2024, 6, 5, tzinfo=UTC)),
        ("yesterday", datetime(2024, 6, 4, tzinfo=UTC)),
        ("-1d", NOW - timedelta(days=1)),
        ("-2h30m", NOW - timedelta(hours=2, minutes=30)),
        ("+15m", NOW + timedelta(minutes=15)),
        ("-1w", NOW - timedelta(weeks=1)),
        ("-90s", NOW - timedelta(seconds=90)),
        ("2024-06-01", datetime(2024, 6, 1, tzinfo=UTC)),
        ("2024-06-01T12:00", datetime(2024, 6, 1, 12, tzinfo=UTC)),
        ("2024-06-01T12:00:00Z", datetime(2024, 6, 1, 12, tzinfo=UTC)),
        ("2024-06-01T14:00:00+02:00", datetime(2024, 6, 1, 12, tzinfo=UTC)),
        ("2024-06-01 12:00", datetime(2024, 6, 1, 12, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, want: datetime) -> None:
    got = parse_time(text, NOW)
    assert got == want
    assert got.tzinfo is not None and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["", "last week", "-1x", "2024-13-01", "1d"])
def test_parse_time_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="relative offset like -1d"):
        parse_time(text, NOW)


def test_export_parquet_has_exactly_the_selected_rows(lake: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "day2.parquet"
    seen: list[tuple[str, int]] = []
    query = LakeQuery(
        str(lake),
        since=DAY2,
        until=DAY2 + timedelta(days=1),
        devices=("edge-01", "edge-03"),
        metrics=("temperature",),
    )
    n = export(query, out, on_partition=lambda folder, rows: seen.append((folder, rows)))
    got = pl.read_parquet(out)
    every = pl.read_parquet(lake / "**" / "*.parquet", hive_partitioning=False)
    want = every.filter(
        (pl.col("ts") >= DAY2)
        & (pl.col("ts") < DAY2 + timedelta(days=1))
        & pl.col("device").is_in(["edge-01", "edge-03"])
        & (pl.col("metric") == "temperature")
    )
    assert n == got.height == want.height == 1440 + 1440 - 120  # edge-03 was down 2 hours
    assert sorted(got["record_id"]) == sorted(want["record_id"])
    assert got["ts"].is_sorted()
    assert seen == [("metric=temperature/date=2024-06-02", n)]
    meta = pq.ParquetFile(out).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert not list(out.parent.glob(".*"))  # the temp file was renamed away


def test_export_csv_with_where(lake: Path, tmp_path: Path) -> None:
    out = tmp_path / "hot.csv"
    n = run_export(
        str(lake), out, where="max > 30", metrics=["temperature"], progress=True, now=NOW
    )
    back = pl.read_csv(out, try_parse_dates=True)
    assert n == back.height > 0
    assert (back["max"] > 30).all()
    assert back["ts"].dtype == pl.Datetime("us", "UTC")
    every = pl.read_parquet(lake / "**" / "*.parquet", hive_partitioning=False)
    assert n == every.filter((pl.col("metric") == "temperature") & (pl.col("max") > 30)).height


def test_export_mixed_shapes_into_one_file(tmp_path: Path) -> None:
    """Aggregates and raw readings in one lake (even one folder) export as one table."""
    root = tmp_path / "lake"
    write_lake(aggregate_table(days=1, devices=("a",), gap=None), root)
    raw = pa.table(
        {
            "ts": pa.array([datetime(2024, 6, 1, 3, tzinfo=UTC)] * 2, pa.timestamp("us", tz="UTC")),
            "device": ["b", "b"],
            "source": ["s", "s"],
            "metric": ["temperature", "voltage"],
            "value": [40.0, 231.5],
            "unit": ["C", "V"],
            "site": ["north", "north"],
            "record_id": ["r:0", "r:1"],
        }
    )
    for folder, part in split(pl.DataFrame(raw), ("metric", "date")):
        (root / folder).mkdir(parents=True, exist_ok=True)  # temperature: next to aggregates
        part.write_parquet(root / folder / "part-raw.parquet")
    out = tmp_path / "all.parquet"
    n = export(LakeQuery(str(root)), out)
    got = pl.read_parquet(out)
    assert n == got.height == 3 * 1440 + 2
    assert {"value", "mean", "site", "partial"} <= set(got.columns)
    b = got.filter(pl.col("device") == "b").sort("metric")
    assert b["value"].to_list() == [40.0, 231.5] and b["mean"].null_count() == 2
    hot = export(LakeQuery(str(root), where="value > 35"), tmp_path / "v.csv")
    assert hot == 2  # aggregates have no value: null is not true


def test_pruned_partitions_are_never_opened(lake: Path, tmp_path: Path) -> None:
    """A corrupt file in a partition the query cannot need proves it is not read."""
    root = tmp_path / "lake"
    write_lake(aggregate_table(days=3, devices=("edge-01",)), root)
    bad = root / "metric=humidity" / "date=2024-06-01" / "part-corrupt.parquet"
    bad.write_bytes(b"not parquet at all")
    (root / "metric=humidity" / "date=2024-06-02" / ".part-x.parquet.tmp").write_bytes(b"")
    files = list_files(LakeQuery(str(root), since=DAY2))
    assert all(f.partition[1][1] >= "2024-06-02" for f in files)
    assert scan_lake(str(root), since=DAY2).collect().height == 3 * 2 * 1440
    assert scan_lake(str(root), metrics=["pressure"]).collect().height == 3 * 1440
    with pytest.raises(Exception):  # noqa: B017 - the corrupt file is read and polars fails
        scan_lake(str(root), metrics=["humidity"]).collect()


def test_time_parts_and_device_partitions_prune(tmp_path: Path) -> None:
    """A lake partitioned by device/year/month/day/hour prunes on each of them."""
    root = tmp_path / "lake"
    table = aggregate_table(days=2, gap=None).append_column(
        "record_id", pa.array([str(i) for i in range(3 * 3 * 2 * 1440)])
    )
    for folder, part in split(pl.DataFrame(table), ("device", "year", "month", "day", "hour")):
        (root / folder).mkdir(parents=True)
        part.write_parquet(root / folder / "part-1.parquet")
    since, until = datetime(2024, 6, 1, 22, tzinfo=UTC), datetime(2024, 6, 2, 1, 30, tzinfo=UTC)
    query = LakeQuery(str(root), since=since, until=until, devices=("edge-02",))
    files = list_files(query)
    assert [f.folder for f in files] == [
        "device=edge-02/year=2024/month=06/day=01/hour=22",
        "device=edge-02/year=2024/month=06/day=01/hour=23",
        "device=edge-02/year=2024/month=06/day=02/hour=00",
        "device=edge-02/year=2024/month=06/day=02/hour=01",
    ]
    assert export(query, tmp_path / "o.parquet", files=files) == 3 * 210  # 3 metrics x 3.5h


def test_errors_are_clear(lake: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_files(LakeQuery(str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="invalid SQL"):
        LakeQuery(str(lake), where="max >")
    with pytest.raises(ValueError, match=r"\.parquet or \.csv"):
        export(LakeQuery(str(lake)), tmp_path / "x.json")


def test_empty_selection_writes_an_empty_file(lake: Path, tmp_path: Path) -> None:
    out = tmp_path / "none.csv"
    assert export(LakeQuery(str(lake), devices=("nobody",)), out) == 0
    assert pl.read_csv(out).height == 0


# ---------------------------------------------------------------------------------------------
# one row per window: complete rows supersede the partial rows a stop wrote (issue 12 item 4)

T0 = datetime(2024, 6, 1, 10, tzinfo=UTC)
WINDOW_COLUMNS = {
    "ts": pa.timestamp("us", tz="UTC"),
    "device": pa.string(),
    "source": pa.string(),
    "metric": pa.string(),
    "site": pa.string(),
    "unit": pa.string(),
    "mean": pa.float64(),
    "count": pa.int64(),
    "partial": pa.bool_(),
    "record_id": pa.string(),
}


def window_file(root: Path, name: str, rows: list[tuple]) -> None:
    """One lake file of window rows: (minute, device, site, unit, mean, count, partial)."""
    table = pa.table(
        {
            "ts": [T0 + timedelta(minutes=r[0]) for r in rows],
            "device": [r[1] for r in rows],
            "source": ["room"] * len(rows),
            "metric": ["temperature"] * len(rows),
            "site": [r[2] for r in rows],
            "unit": [r[3] for r in rows],
            "mean": [r[4] for r in rows],
            "count": [r[5] for r in rows],
            "partial": [r[6] for r in rows],
            "record_id": [f"{name}:{i}" for i in range(len(rows))],
        },
        schema=pa.schema(WINDOW_COLUMNS),
    )
    folder = root / "metric=temperature" / "date=2024-06-01"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"part-{name}.parquet")


@pytest.fixture
def window_lake(tmp_path: Path) -> Path:
    """Hand-written: what a collector stopped twice inside windows leaves in the lake."""
    root = tmp_path / "wlake"
    # first life: stopped at 10:00:40 and at 10:01:30, windows still open -> partial rows
    window_file(root, "a-0001", [(0, "d1", "north", None, 20.0, 2, True),
                                 (0, "d2", "north", "C", 30.0, 4, True),
                                 (1, "d1", "north", "C", 21.0, 3, True)])
    window_file(root, "a-0002", [(1, "d1", "north", "C", 21.5, 5, True),
                                 (1, "d1", "south", "C", 25.0, 1, True)])
    # after the restart the 10:00 window of d1 closed: its complete row (another unit spelling)
    window_file(root, "a-0003", [(0, "d1", "north", "C", 20.5, 8, False),
                                 (2, "d1", "north", "C", 22.0, 6, False)])
    # raw readings (no partial column) sharing a timestamp: never touched
    keys = ("ts", "device", "source", "metric")
    raw_schema = pa.schema({k: WINDOW_COLUMNS[k] for k in keys} | {"value": pa.float64()})
    raw = pa.table({"ts": [T0, T0], "device": ["d1", "d1"], "source": ["room", "room"],
                    "metric": ["temperature", "temperature"], "value": [1.0, 2.0]},
                   schema=raw_schema)
    pq.write_table(raw, root / "metric=temperature" / "date=2024-06-01" / "part-raw.parquet")
    return root


def _windows(frame: pl.DataFrame) -> list[tuple]:
    rows = frame.filter(pl.col("partial").is_not_null()).sort("ts", "device", "site")
    return rows.select(
        pl.col("ts").dt.minute(), "device", "site", "count", "partial"
    ).rows()


EXPECTED_WINDOWS = [
    (0, "d1", "north", 8, False),  # the complete row superseded the 2-reading partial one
    (0, "d2", "north", 4, True),  # never completed (yet): the partial row stays
    (1, "d1", "north", 5, True),  # two stops in one window: the fuller partial row
    (1, "d1", "south", 1, True),  # another tag value is another window
    (2, "d1", "north", 6, False),
]


def test_export_shows_one_row_per_window(window_lake: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.parquet"
    n = run_export(str(window_lake), out, progress=False, now=NOW)
    got = pl.read_parquet(out)
    assert n == got.height == len(EXPECTED_WINDOWS) + 2
    assert _windows(got) == EXPECTED_WINDOWS
    raw = got.filter(pl.col("partial").is_null())
    assert sorted(raw["value"].to_list()) == [1.0, 2.0]
    # supersede first, then --where: the complete row is judged, not the partial it replaced
    n = run_export(str(window_lake), tmp_path / "few.csv", where="count < 3", progress=False)
    few = pl.read_csv(tmp_path / "few.csv")
    assert n == 1 and few["count"].to_list() == [1]

    everything = tmp_path / "all.parquet"
    n = run_export(str(window_lake), everything, keep_partial=True, progress=False)
    assert n == 7 + 2
    assert pl.read_parquet(everything).filter(pl.col("partial"))["count"].sort().to_list() == [
        1, 2, 3, 4, 5]


def test_lake_scan_and_the_spool_reader_supersede_too(window_lake: Path) -> None:
    from dashboards import data

    frame = data.lake_frame(LakeQuery(str(window_lake))).collect()
    assert _windows(frame) == EXPECTED_WINDOWS
    stats = data.to_stats(data.lake_frame(LakeQuery(str(window_lake)))).collect()
    assert stats.filter(pl.col("count") > 1).height == len(EXPECTED_WINDOWS) - 1
    # the spool: Arrow stream files of the same rows
    files = sorted(window_lake.rglob("part-a-*.parquet"))
    spool = window_lake.parent / "spool"
    spool.mkdir()
    paths = []
    for f in files:
        table = pq.read_table(f)
        path = spool / f"{f.stem}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        paths.append(path)
    assert _windows(data.spool_frame(LakeQuery(str(spool)), paths).collect()) == EXPECTED_WINDOWS


def test_catalog_view_keeps_one_row_per_window(window_lake: Path) -> None:
    """The Athena view's SQL, run by DuckDB on the same files, keeps the same rows."""
    import duckdb

    from collector.commands.catalog import columns_from_schema, ddl

    files = sorted(str(f) for f in window_lake.rglob("part-a-*.parquet"))
    schema = pq.read_schema(files[0])
    text = ddl("s3://bucket/lake", ["metric", "date"], columns_from_schema(schema))
    view = text[text.index("CREATE OR REPLACE VIEW"):]
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE readings AS SELECT *, '2024-06-01' AS date FROM read_parquet(?)", [files]
    )
    con.execute(view)
    got = con.execute(
        'SELECT minute(ts), device, site, "count", partial FROM readings_windows '
        "ORDER BY ts, device, site"
    ).fetchall()
    assert [tuple(r) for r in got] == EXPECTED_WINDOWS


# ---------------------------------------------------------------------------------------------
# export errors: one line, no traceback, exit 2 for what was typed, 1 for I/O (issue 17 item 5)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1"}
    return subprocess.run(
        [sys.executable, "-m", "collector", "export", *args, "--no-progress"],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_export_errors_are_one_line(lake: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    res = cli("--lake", str(lake), "--where", "maxx > 1", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2
    assert "maxx" in one_line_error(res)
    res = cli("--lake", str(lake), "--where", "max > 'abc'", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2
    assert "cannot compare string with numeric" in one_line_error(res)
    res = cli("--lake", "s3://nobucket/x", "--endpoint-url", "http://127.0.0.1:9",
              "--out", str(out), cwd=tmp_path)
    assert res.returncode == 1
    assert "nobucket" in one_line_error(res)
    assert not out.exists()


def test_a_filter_value_the_lake_lacks_says_so(lake: Path, tmp_path: Path) -> None:
    out = tmp_path / "typo.parquet"
    res = cli("--lake", str(lake), "--metric", "temprature", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 1
    line = one_line_error(res)
    assert "--metric temprature matches nothing" in line and "temperature" in line
    # the empty file still has the lake's columns (an aggregate lake: mean, min, max, count)
    empty = pl.read_parquet(out)
    assert empty.height == 0
    assert set(pl.read_parquet(next(lake.rglob("*.parquet"))).columns) <= set(empty.columns)
    # a real value outside the time range is no error: 0 rows, exit 0, the lake's columns
    res = cli("--lake", str(lake), "--metric", "temperature", "--since", "2030-01-01",
              "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "0 rows" in res.stdout and "mean" in pl.read_parquet(out).columns


# ---------------------------------------------------------------------------------------------
# export from a spool: rows not uploaded yet (issue 17 item 4)


def spool_dir(root: Path, lake: Path) -> tuple[Path, pl.DataFrame]:
    """``<root>/data/spool/bulk`` as the runtime writes it (spool files named by batch id;
    the one in flight of an older version, a bare Arrow IPC stream), holding one day of the
    lake: ready batches, one in flight, a torn file, and a dead letter that is no part of the
    backlog."""
    from collector.runtime.log import encode_frame
    from collector.runtime.spool import encode_file

    rows = pl.read_parquet(sorted(lake.rglob("*.parquet")), hive_partitioning=False).filter(
        (pl.col("ts") >= DAY2) & (pl.col("ts") < DAY2 + timedelta(hours=2))
    )
    folder = root / "data" / "spool" / "bulk"
    (folder / "inflight").mkdir(parents=True)
    (folder / "dead-letter").mkdir()
    thirds = [rows.slice(0, 360), rows.slice(360, 360), rows.slice(720)]
    names = [f"edge-01-3f9a2c1b-{i:012d}-{i:012d}.arrow" for i in (1, 2, 3)]
    (folder / names[0]).write_bytes(encode_file(thirds[0], 0))
    (folder / names[2]).write_bytes(encode_file(thirds[2], 0))
    (folder / "inflight" / names[1]).write_bytes(encode_frame(thirds[1]))
    (folder / "edge-01-3f9a2c1b-000000000004-000000000004.arrow").write_bytes(b"ARROW1 torn")
    pq.write_table(rows.head(7).to_arrow(), folder / "dead-letter" / "x.parquet")
    (root / "data" / "spool" / "other" / "inflight").mkdir(parents=True)
    return folder, rows


def test_export_reads_a_spool_folder(lake: Path, tmp_path: Path) -> None:
    folder, rows = spool_dir(tmp_path, lake)
    res = cli("--lake", str(folder), "--out", str(tmp_path / "all.parquet"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith(f"{rows.height} rows -> {tmp_path / 'all.parquet'}")
    got = pl.read_parquet(tmp_path / "all.parquet")
    assert sorted(got["record_id"]) == sorted(rows["record_id"])  # each spooled row once
    # filters, --where and CSV work as on a lake
    res = cli("--lake", str(folder), "--device", "edge-02", "--metric", "humidity",
              "--where", "max > mean", "--out", str(tmp_path / "some.csv"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    want = rows.filter((pl.col("device") == "edge-02") & (pl.col("metric") == "humidity")
                       & (pl.col("max") > pl.col("mean")))
    assert sorted(pl.read_csv(tmp_path / "some.csv")["record_id"]) == sorted(want["record_id"])
    # a typo in a filter says so, for a spool too
    res = cli("--lake", str(folder), "--device", "edge-9", "--out", str(tmp_path / "n.parquet"),
              cwd=tmp_path)
    assert res.returncode == 1 and "matches nothing in the spool" in res.stderr
    # the parent of the sinks' spools is no lake (its dead letters must not pass for one)
    res = cli("--lake", str(folder.parent), "--out", str(tmp_path / "p.parquet"), cwd=tmp_path)
    assert res.returncode == 2
    assert str(folder) in res.stderr and str(folder.parent / "other") in res.stderr
    # a spool with nothing waiting: 0 rows, exit 0, the canonical columns
    res = cli("--lake", str(folder.parent / "other"), "--out", str(tmp_path / "e.parquet"),
              cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("0 rows")
    assert {"ts", "device", "metric"} <= set(pl.read_parquet(tmp_path / "e.parquet").columns)


def test_dashboard_and_export_read_the_spool_with_one_code(lake: Path, tmp_path: Path) -> None:
    from dashboards import data

    folder, rows = spool_dir(tmp_path, lake)
    query = LakeQuery(str(folder), devices=("edge-01",))
    exported = tmp_path / "x.parquet"
    n = export(query, exported)
    shown = data.lake_frame(query).collect()
    assert n == shown.height == rows.filter(pl.col("device") == "edge-01").height
    paths = data.spool_paths(tmp_path / "data", "bulk")
    assert [p.parent.name for p in paths] == ["bulk"] * 3 + ["inflight"]
    assert_same = sorted(data.spool_frame(query, paths).collect()["record_id"])
    assert assert_same == sorted(pl.read_parquet(exported)["record_id"])
