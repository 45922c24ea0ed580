"""lake and console sinks: what lands on disk / stdout, atomic overwrite, sanitised partitions."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from collector.errors import PartialWriteError, PermanentSinkError, TransientSinkError
from collector.plugin import Context
from collector.schema import RECORD_ID
from sinks.console import ConsoleConfig, ConsoleSink
from sinks.lake import LakeConfig, LakeSink

from .conftest import readings


def with_ids(df: pl.DataFrame, batch_id: str) -> pl.DataFrame:
    return df.with_columns(
        (pl.lit(f"{batch_id}:") + pl.int_range(pl.len()).cast(pl.String)).alias(RECORD_ID)
    )


async def lake(tmp_path: Path, **cfg: Any) -> LakeSink:
    sink = LakeSink(
        LakeConfig.model_validate({"type": "lake", "path": str(tmp_path / "lake"), **cfg}),
        Context(device="d1", component="lake", data_dir=tmp_path),
    )
    await sink.open()
    return sink


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_lake_partitions_and_readers(tmp_path: Path) -> None:
    sink = await lake(tmp_path)
    df = readings([(0, "a", "t", 1.0, "C"), (86400, "a", "t", 2.0, "C"), (5, "b", "h", 50.0)])
    await sink.write(with_ids(df, "000001-000002"), "000001-000002")
    root = tmp_path / "lake"
    assert files(root) == [
        "metric=h/date=2024-01-01/part-000001-000002.parquet",
        "metric=t/date=2024-01-01/part-000001-000002.parquet",
        "metric=t/date=2024-01-02/part-000001-000002.parquet",
    ]
    back = pl.scan_parquet(str(root) + "/**/*.parquet", hive_partitioning=True).collect()
    assert back.sort("ts").select(df.columns).equals(df.sort("ts"))
    assert back.schema["ts"] == pl.Datetime("us", "UTC")
    con = duckdb.connect()
    rows = con.sql(
        f"SELECT metric, date, sum(value) FROM read_parquet('{root}/**/*.parquet', "
        "hive_partitioning = true) GROUP BY ALL ORDER BY ALL").fetchall()
    assert [(m, str(d), v) for m, d, v in rows] == [
        ("h", "2024-01-01", 50.0), ("t", "2024-01-01", 1.0), ("t", "2024-01-02", 2.0)]
    meta = pq.ParquetFile(root / "metric=t/date=2024-01-01/part-000001-000002.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


async def test_lake_replayed_batch_overwrites_instead_of_duplicating(tmp_path: Path) -> None:
    sink = await lake(tmp_path, compression_level=9)
    df = readings([(i, "a", "t", float(i)) for i in range(100)])
    await sink.write(with_ids(df, "b1"), "b1")
    await sink.write(with_ids(df, "b1"), "b1")  # the runtime retried after a crash
    await sink.write(with_ids(df.head(3), "b2"), "b2")
    root = tmp_path / "lake"
    assert files(root) == ["metric=t/date=2024-01-01/part-b1.parquet",
                           "metric=t/date=2024-01-01/part-b2.parquet"]  # no temp files left
    back = pl.read_parquet(str(root) + "/**/*.parquet", hive_partitioning=True)
    assert back.height == 103
    assert back[RECORD_ID].n_unique() == 103


async def test_lake_write_is_atomic_when_it_fails(tmp_path: Path, monkeypatch: Any) -> None:
    sink = await lake(tmp_path)
    df = readings([(i, "a", "t", float(i)) for i in range(10)])
    await sink.write(with_ids(df, "b1"), "b1")
    target = tmp_path / "lake/metric=t/date=2024-01-01/part-b1.parquet"
    before = target.read_bytes()

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(TransientSinkError, match="No space"):
        await sink.write(with_ids(df.head(2), "b1"), "b1")
    assert target.read_bytes() == before  # the old file is intact, no temp file left
    assert files(tmp_path / "lake") == ["metric=t/date=2024-01-01/part-b1.parquet"]


async def test_lake_sanitises_partition_values(tmp_path: Path) -> None:
    sink = await lake(tmp_path, partition_by=["device", "metric"])
    df = readings([(0, "../../escape", "t", 1.0), (1, "..", "../m", 2.0),
                   (2, "a/b", "t", 3.0), (3, "ok", "t", 4.0)])
    await sink.write(with_ids(df, "../b"), "../b")
    root = (tmp_path / "lake").resolve()
    written = [p.resolve() for p in tmp_path.rglob("*.parquet")]
    assert len(written) == 4
    assert all(p.is_relative_to(root) for p in written)
    assert all(len(p.relative_to(root).parts) == 3 for p in written)  # device/metric/file
    assert [p for p in tmp_path.iterdir() if p.name != "lake"] == []
    back = pl.read_parquet(str(root) + "/**/*.parquet", hive_partitioning=True)
    assert sorted(back["device"]) == ["..", "../../escape", "a/b", "ok"]
    assert sorted(back["metric"]) == ["../m", "t", "t", "t"]


async def test_lake_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="partition key"):
        LakeConfig.model_validate({"type": "lake", "partition_by": ["a/b"]})
    with pytest.raises(ValidationError, match="once"):
        LakeConfig.model_validate({"type": "lake", "partition_by": ["metric", "metric"]})
    sink = await lake(tmp_path, partition_by=["site", "date"])
    with pytest.raises(PermanentSinkError, match="site"):
        await sink.write(with_ids(readings([(0, "a", "t", 1.0)]), "b"), "b")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sink = LakeSink(LakeConfig(type="lake", path=str(blocker / "lake")),
                    Context(device="d1", component="lake", data_dir=tmp_path))
    with pytest.raises(TransientSinkError):
        await sink.write(with_ids(readings([(0, "a", "t", 1.0)]), "b"), "b")


async def test_lake_takes_window_aggregates(tmp_path: Path) -> None:
    sink = await lake(tmp_path)
    table = pl.DataFrame({
        "ts": [datetime(2024, 1, 1, tzinfo=UTC)],
        "device": ["d"], "source": ["s"], "metric": ["t"], "mean": [1.5], "count": [2],
        "partial": [True], RECORD_ID: ["w:0"]})
    await sink.write(table, "w")
    back = pl.read_parquet(str(tmp_path / "lake") + "/**/*.parquet", hive_partitioning=True)
    assert back.select("mean", "count", "partial").to_dicts() == [
        {"mean": 1.5, "count": 2, "partial": True}]


async def test_console_prints_ndjson(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sink = ConsoleSink(ConsoleConfig(type="console"),
                       Context(device="d1", component="screen", data_dir=tmp_path))
    df = readings([(0.5, "a", "t", 1.5, "C"), (1, "b", "h", float("nan"))])
    await sink.write(with_ids(df, "b"), "b")
    await sink.write(with_ids(df.clear(), "c"), "c")
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"ts": "2024-01-01T00:00:00.500+00:00", "device": "a", "source": "s", "metric": "t",
         "value": 1.5, "unit": "C"},
        {"ts": "2024-01-01T00:00:01+00:00", "device": "b", "source": "s", "metric": "h",
         "value": None, "unit": None},
    ]
    for line in lines:
        datetime.fromisoformat(json.loads(line)["ts"])
    sink = ConsoleSink(ConsoleConfig(type="console", record_id=True),
                       Context(device="d1", component="screen", data_dir=tmp_path))
    await sink.write(with_ids(df.head(1), "b"), "b")
    assert json.loads(capsys.readouterr().out)[RECORD_ID] == "b:0"


# -- one bad partition costs itself (issue 13 row 1) -------------------------------------------

FLEET_BATCH = "edge-" + "x" * 29 + "_0123456789-1a2b3c4d-000000000017-000000000058-0003"
"""A batch id of the runtime's shape with the longest device slug (40 bytes)."""
CJK = "温度传感器" * 6  # 30 characters, 270 bytes once percent-encoded


def _names_fit(root: Path) -> None:
    for path in root.rglob("*"):
        assert len(path.name.encode()) <= 255, path.name


async def test_lake_long_metric_lands_under_a_bounded_folder(tmp_path: Path) -> None:
    """30 CJK characters, a 1 MB name and two long names sharing a prefix: every row lands,
    every folder name is short, the two long names stay apart, the full value is in the file."""
    sink = await lake(tmp_path)
    long_a, long_b = "m" * 300 + "a", "m" * 300 + "b"
    huge = "x" * 1_000_000
    good = [(i, "d", "temperature", float(i)) for i in range(41)]
    df = readings([*good, (41, "d", CJK, 1.0), (42, "d", long_a, 2.0), (43, "d", long_b, 3.0),
                   (44, "d", huge, float("nan")), (45, "d", "", float("inf"))])
    await sink.write(with_ids(df, FLEET_BATCH), FLEET_BATCH)
    root = tmp_path / "lake"
    _names_fit(root)
    folders = {p.parent.parent.name for p in root.rglob("*.parquet")}
    assert len(folders) == 6  # temperature, CJK, long_a, long_b, huge, empty: no collision
    assert all(len(f.encode()) <= len("metric=") + 120 for f in folders)
    back = pl.read_parquet(str(root) + "/**/*.parquet", hive_partitioning=False)
    assert back.height == df.height
    assert back[RECORD_ID].n_unique() == df.height
    assert sorted(back["metric"].unique()) == sorted({r[2] for r in good} | {
        CJK, long_a, long_b, huge, ""})
    # the shortened folder still starts with the readable, decodable value
    assert any(f.startswith("metric=%E6%B8%A9") and "~" in f for f in folders)


def _deep_root(tmp_path: Path, total: int) -> Path:
    """A folder whose absolute path is about ``total`` bytes long (PATH_MAX is 4,096)."""
    root = tmp_path
    while len(str(root)) < total - 210:
        root = root / ("d" * 200)
    return root / ("e" * max(1, total - len(str(root)) - 1))


async def test_lake_partition_that_cannot_be_written_is_rejected_alone(tmp_path: Path) -> None:
    """A real ENAMETOOLONG (a deep lake path plus a long partition value passes PATH_MAX):
    only that partition's rows are rejected, on the first try; the others land."""
    root = _deep_root(tmp_path, 3_960)
    sink = LakeSink(LakeConfig(type="lake", path=str(root)),
                    Context(device="d1", component="lake", data_dir=tmp_path))
    await sink.open()
    df = readings([(i, "d", "t", float(i)) for i in range(41)] + [(41, "d", CJK, 0.0)])
    with pytest.raises(PartialWriteError) as caught:
        await sink.write(with_ids(df, "b"), "b")
    err = caught.value
    assert err.retry_rows is None
    assert err.rejected_rows is not None
    assert err.rejected_rows.get_column("metric").to_list() == [CJK]
    assert err.rejected_rows.schema == with_ids(df, "b").schema  # the batch's own types
    assert len(err.reasons) == 1 and "too long" in err.reasons[0].lower()
    landed = pl.read_parquet(str(root) + "/**/*.parquet", hive_partitioning=False)
    assert sorted(landed[RECORD_ID]) == sorted(f"b:{i}" for i in range(41))


async def test_lake_partition_blocked_for_now_is_retried_alone(tmp_path: Path) -> None:
    """A file where one partition's folder should be (fixable: transient): the other partition
    lands now, the blocked rows come back; once fixed they land, nothing twice."""
    sink = await lake(tmp_path)
    root = tmp_path / "lake"
    root.mkdir(exist_ok=True)
    (root / "metric=h").write_text("in the way")
    df = readings([(i, "d", "t" if i % 2 else "h", float(i)) for i in range(10)])
    table = with_ids(df, "b")
    with pytest.raises(PartialWriteError) as caught:
        await sink.write(table, "b")
    err = caught.value
    assert err.rejected_rows is None and err.retry_rows is not None
    assert set(err.retry_rows.get_column("metric").to_list()) == {"h"}
    (root / "metric=h").unlink()
    await sink.write(err.retry_rows, "b")
    back = pl.read_parquet(str(root) + "/**/*.parquet", hive_partitioning=False)
    assert sorted(back[RECORD_ID]) == sorted(table.get_column(RECORD_ID).to_list())


async def test_lake_every_partition_blocked_is_one_transient_error(tmp_path: Path) -> None:
    sink = await lake(tmp_path)
    root = tmp_path / "lake"
    root.mkdir(exist_ok=True)
    (root / "metric=t").write_text("in the way")
    with pytest.raises(TransientSinkError):
        await sink.write(with_ids(readings([(0, "d", "t", 1.0)]), "b"), "b")


async def test_lake_default_path_is_in_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "dd"
    sink = LakeSink(LakeConfig(type="lake"), Context(device="d", component="lake",
                                                     data_dir=data_dir))
    await sink.open()
    await sink.write(with_ids(readings([(0, "d", "t", 1.0)]), FLEET_BATCH), FLEET_BATCH)
    (written,) = list(tmp_path.rglob("*.parquet"))
    assert written.is_relative_to(data_dir / "lake")
    assert written.name == f"part-{FLEET_BATCH}.parquet"


async def test_lake_file_names_fit_whatever_the_batch_id(tmp_path: Path) -> None:
    sink = await lake(tmp_path)
    for batch in (FLEET_BATCH, "β" * 200 + "-000000000001", "z" * 400):
        await sink.write(with_ids(readings([(0, "d", "t", 1.0)]), batch), batch)
    _names_fit(tmp_path / "lake")
    assert len(list((tmp_path / "lake").rglob("*.parquet"))) == 3


async def test_lake_removes_temp_files_a_killed_writer_left(tmp_path: Path) -> None:
    """A kill -9 during a write leaves `.part-….tmp`; `pl.scan_parquet(lake)` would refuse the
    tree. The next start removes it, but never the file of a writer still running."""
    folder = tmp_path / "lake" / "metric=t" / "date=2024-01-01"
    folder.mkdir(parents=True)
    dead = folder / ".part-b.parquet.999999999-1-0123abcd.tmp"
    mine = folder / f".part-c.parquet.{os.getpid()}-1-0123abcd.tmp"
    other = folder / "notes.tmp"
    for p in (dead, mine, other):
        p.write_bytes(b"half a file")
    sink = await lake(tmp_path)
    await sink.write(with_ids(readings([(0, "a", "t", 1.0)]), "b"), "b")
    assert not dead.exists() and mine.exists() and other.exists()
