"""collector.commands.export: time arguments, partition pruning, the files export writes."""

from __future__ import annotations

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
    for folder, part in split(raw, ("metric", "date")):
        (root / folder).mkdir(parents=True, exist_ok=True)  # temperature: next to aggregates
        pq.write_table(part, root / folder / "part-raw.parquet")
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
    for folder, part in split(table, ("device", "year", "month", "day", "hour")):
        (root / folder).mkdir(parents=True)
        pq.write_table(part, root / folder / "part-1.parquet")
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
