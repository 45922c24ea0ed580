"""The replay source: CSV/Parquet, narrow/wide, sentinels, time parsing, chunking, pacing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from pydantic import ValidationError

from collector.errors import ConfigError
from collector.plugin import Context
from collector.schema import POLARS_SCHEMA
from collector.sources.replay import ReplayConfig, ReplaySource

from .conftest import collect

UCI_HEADER = "Date;Time;CO(GT);NOx(GT);T;Station\n"




def make(tmp_path: Path, **cfg: Any) -> ReplaySource:
    config = ReplayConfig.model_validate({"name": "air", "speed": "max", **cfg})
    return ReplaySource(config, Context(device="d1", component="air", data_dir=tmp_path))


async def run(src: ReplaySource) -> list[pl.DataFrame]:
    await src.open()
    return await collect(src.stream())


UCI = {
    "separator": ";",
    "decimal_comma": True,
    "time_column": ["Date", "Time"],
    "time_format": "%d/%m/%Y %H.%M.%S",
    "layout": "wide",
    "missing_values": [-200],
}


async def test_wide_csv_with_date_time_columns_and_sentinels(tmp_path: Path) -> None:
    path = tmp_path / "air.csv"
    path.write_text(
        UCI_HEADER
        + "10/03/2004;18.00.00;2,6;-200;13,6;a\n"
        + "10/03/2004;19.00.00;-200;103;13,3;b\n"
    )
    src = make(tmp_path, path=str(path), timezone="Europe/Rome", **UCI)
    frames = await run(src)
    df = pl.concat(frames)
    assert dict(df.schema) == POLARS_SCHEMA
    assert df.height == 6  # 2 rows x 3 numeric columns (Station is text)
    assert set(df["metric"]) == {"CO(GT)", "NOx(GT)", "T"}
    # Rome is UTC+1 in March: recorded 18:00 local is 17:00 UTC.
    assert df["ts"].min() == datetime(2004, 3, 10, 17, tzinfo=UTC)
    got = {(r["ts"].hour, r["metric"]): r["value"] for r in df.to_dicts()}
    assert got[(17, "CO(GT)")] == 2.6
    assert got[(17, "NOx(GT)")] is None
    assert got[(18, "CO(GT)")] is None
    assert got[(18, "NOx(GT)")] == 103.0
    assert got[(18, "T")] == 13.3
    assert set(df["device"]) == {"d1"} and set(df["source"]) == {"air"}
    assert df["ts"].is_sorted()


async def test_drop_missing_and_column_choice(tmp_path: Path) -> None:
    path = tmp_path / "air.csv"
    path.write_text(
        UCI_HEADER
        + "10/03/2004;18.00.00;2,6;-200;13,6;a\n"
        + "10/03/2004;19.00.00;-200;103;13,3;b\n"
    )
    src = make(tmp_path, path=str(path), drop_missing=True, columns=["CO(GT)", "NOx(GT)"],
               units={"CO(GT)": "mg/m3"}, **UCI)
    df = pl.concat(await run(src))
    assert sorted(zip(df["metric"], df["value"], strict=True)) == [
        ("CO(GT)", 2.6), ("NOx(GT)", 103.0)]
    assert df.filter(pl.col("metric") == "CO(GT)")["unit"].to_list() == ["mg/m3"]
    assert df["ts"].dt.hour().to_list() == [18, 19]  # naive times default to UTC


async def test_chunks_are_bounded_and_complete(tmp_path: Path) -> None:
    rows = ["Date;Time;a;b;c"]
    start = datetime(2024, 1, 1)
    for i in range(1000):
        t = start + timedelta(minutes=i)
        rows.append(f"{t:%d/%m/%Y};{t:%H:%M:%S};{i};{-200 if i % 4 == 0 else i};{i * 2}")
    path = tmp_path / "big.csv"
    path.write_text("\n".join(rows) + "\n")
    src = make(tmp_path, path=str(path), separator=";", time_column=["Date", "Time"],
               time_format="%d/%m/%Y %H:%M:%S", layout="wide", missing_values=[-200],
               chunk_rows=500)
    frames = await run(src)
    assert all(f.height <= 500 for f in frames)
    df = pl.concat(frames)
    assert df.height == 3000
    assert df["ts"].is_sorted()
    assert df.filter(pl.col("value").is_null()).height == 250
    a = df.filter(pl.col("metric") == "a").sort("ts")
    assert a["value"].to_list() == [float(i) for i in range(1000)]
    assert a["ts"][999] == datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=999)


async def test_narrow_parquet_with_device_column_and_unit(tmp_path: Path) -> None:
    path = tmp_path / "rec.parquet"
    pl.DataFrame(
        {
            "ts": [datetime(2024, 1, 1, 0, 0, i) for i in range(4)],
            "sensor": ["a", "b", "a", None],
            "metric": ["t", "t", "h", "t"],
            "value": [1.0, -200.0, 3.0, 4.0],
            "unit": ["C", "C", None, "C"],
        }
    ).write_parquet(path)
    src = make(tmp_path, path=str(path), device_column="sensor", missing_values=[-200],
               timezone="America/New_York", units={"h": "%"})
    df = pl.concat(await run(src))
    assert df["device"].to_list() == ["a", "b", "a", "d1"]
    assert df["value"].to_list() == [1.0, None, 3.0, 4.0]
    assert df["unit"].to_list() == ["C", "C", "%", "C"]
    assert df["ts"][0] == datetime(2024, 1, 1, 5, tzinfo=UTC)


async def test_narrow_csv_iso_times_and_bad_rows_go_to_dead_letter(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_text(
        "ts,metric,value\n"
        "2024-01-01T00:00:00Z,t,1.5\n"
        "not a time,t,2.5\n"
        ",,\n"
        "2024-01-01T00:00:10Z,t,3.5\n"
    )
    src = make(tmp_path, path=str(path))
    df = pl.concat(await run(src))
    assert df["value"].to_list() == [1.5, 3.5]
    assert df["ts"][1] == datetime(2024, 1, 1, 0, 0, 10, tzinfo=UTC)
    dead = (tmp_path / "dead-letter" / "air.ndjson").read_text().splitlines()
    assert len(dead) == 1  # the blank line carries nothing; the bad time is kept
    assert json.loads(json.loads(dead[0])["raw"])["value"] == 2.5
    assert src.ctx.counters.get("source_rejected_total", component="air") == 1


async def test_missing_file_or_column_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no file"):
        await make(tmp_path, path=str(tmp_path / "nope.csv")).open()
    path = tmp_path / "n.csv"
    path.write_text("time,metric,value\n2024-01-01T00:00:00Z,t,1\n")
    with pytest.raises(ConfigError, match="no column"):
        await make(tmp_path, path=str(path)).open()


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="format"):
        ReplayConfig.model_validate({"path": "data.bin"})
    assert ReplayConfig.model_validate({"path": "data.bin", "format": "csv"}).speed == 1.0
    with pytest.raises(ValidationError, match="layout: wide"):
        ReplayConfig.model_validate({"path": "a.csv", "columns": ["x"]})
    with pytest.raises(ValidationError, match="speed"):
        ReplayConfig.model_validate({"path": "a.csv", "speed": 0})
    with pytest.raises(ValidationError, match="time zone"):
        ReplayConfig.model_validate({"path": "a.csv", "timezone": "Mars/Olympus"})
    assert ReplayConfig.model_validate({"path": "a.parquet", "speed": "max"}).speed == "max"


class FakeTime:
    """A clock that only moves when the source sleeps: pacing without real waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def paced_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.csv"
    lines = ["ts,metric,value"]
    for i in range(10):  # one reading per second, two at t=4
        lines.append(f"2024-01-01T00:00:{i:02d}Z,m,{i}")
        if i == 4:
            lines.append("2024-01-01T00:00:04Z,m,40")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("speed", [1, 2, 10])
async def test_speed_factor_paces_by_event_time(tmp_path: Path, speed: float) -> None:
    src = make(tmp_path, path=str(paced_file(tmp_path)), speed=speed)
    fake = FakeTime()
    src.clock, src.sleep = fake.clock, fake.sleep
    await src.open()
    t_start = fake.now
    emitted: list[tuple[float, pl.DataFrame]] = []
    async for part in src.stream():
        emitted.append((fake.now, part))
    assert sum(p.height for _, p in emitted) == 11
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    for wall, part in emitted:
        latest = (part["ts"].max() - t0).total_seconds()  # type: ignore[operator]
        assert wall - t_start >= latest / speed - 1e-6  # never early
        earliest = (part["ts"].min() - t0).total_seconds()  # type: ignore[operator]
        assert wall - t_start <= earliest / speed + 1e-6  # never held back once due
    assert sum(fake.sleeps) == pytest.approx(9 / speed)
    assert len(emitted) == 10  # the two t=4 rows travel together


async def test_speed_max_never_sleeps(tmp_path: Path) -> None:
    src = make(tmp_path, path=str(paced_file(tmp_path)), speed="max")
    fake = FakeTime()
    src.clock, src.sleep = fake.clock, fake.sleep
    frames = await run(src)
    assert fake.sleeps == []
    assert sum(f.height for f in frames) == 11


async def test_uci_shaped_file_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "uci.csv"
    lines = [UCI_HEADER]
    start = datetime(2004, 3, 10, 18)
    expected: dict[tuple[datetime, str], float | None] = {}
    for h in range(48):
        t = start + timedelta(hours=h)
        co = None if h % 5 == 0 else h / 10
        nox = None if h % 3 == 0 else float(100 + h)
        co_txt = "-200" if co is None else f"{co:.1f}".replace(".", ",")
        nox_txt = "-200" if nox is None else f"{nox:.0f}"
        lines.append(f"{t:%d/%m/%Y};{t:%H.%M.%S};{co_txt};{nox_txt};1,5;x\n")
        expected[(t.replace(tzinfo=UTC), "CO(GT)")] = co
        expected[(t.replace(tzinfo=UTC), "NOx(GT)")] = nox
        expected[(t.replace(tzinfo=UTC), "T")] = 1.5
    lines.append(";;;;;\n")
    path.write_text("".join(lines))
    df = pl.concat(await run(make(tmp_path, path=str(path), **UCI)))
    got = {(r["ts"], r["metric"]): r["value"] for r in df.to_dicts()}
    assert got == pytest.approx(expected)
