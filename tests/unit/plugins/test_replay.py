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
    src = make(
        tmp_path,
        path=str(path),
        drop_missing=True,
        columns=["CO(GT)", "NOx(GT)"],
        units={"CO(GT)": "mg/m3"},
        **UCI,
    )
    df = pl.concat(await run(src))
    assert sorted(zip(df["metric"], df["value"], strict=True)) == [
        ("CO(GT)", 2.6),
        ("NOx(GT)", 103.0),
    ]
    assert df.filter(pl.col("metric") == "CO(GT)")["unit"].to_list() == ["mg/m3"]
    assert df["ts"].dt.hour().to_list() == [18, 19]  # naive times default to UTC


async def test_wide_column_named_value_is_a_metric(tmp_path: Path) -> None:
    """`timestamp,value`, the commonest sensor export: the column `value` becomes the metric
    `value` (it used to fail with "duplicate column name 'value'" and restart forever)."""
    path = tmp_path / "export.csv"
    path.write_text("timestamp,value\n2024-05-01T10:00:00Z,21.5\n")
    df = pl.concat(
        await run(make(tmp_path, path=str(path), layout="wide", time_column="timestamp"))
    )
    assert df.select("ts", "metric", "value").rows() == [
        (datetime(2024, 5, 1, 10, tzinfo=UTC), "value", 21.5)
    ]
    odd = tmp_path / "odd.csv"  # the other names the narrow schema uses are just as fine
    odd.write_text("timestamp,metric,value,unit\n2024-05-01T10:00:00Z,1,2,x\n")
    df = pl.concat(await run(make(tmp_path, path=str(odd), layout="wide", time_column="timestamp")))
    assert sorted(df.select("metric", "value").rows()) == [("metric", 1.0), ("value", 2.0)]


async def test_chunks_are_bounded_and_complete(tmp_path: Path) -> None:
    rows = ["Date;Time;a;b;c"]
    start = datetime(2024, 1, 1)
    for i in range(1000):
        t = start + timedelta(minutes=i)
        rows.append(f"{t:%d/%m/%Y};{t:%H:%M:%S};{i};{-200 if i % 4 == 0 else i};{i * 2}")
    path = tmp_path / "big.csv"
    path.write_text("\n".join(rows) + "\n")
    src = make(
        tmp_path,
        path=str(path),
        separator=";",
        time_column=["Date", "Time"],
        time_format="%d/%m/%Y %H:%M:%S",
        layout="wide",
        missing_values=[-200],
        chunk_rows=500,
    )
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
    src = make(
        tmp_path,
        path=str(path),
        device_column="sensor",
        missing_values=[-200],
        timezone="America/New_York",
        units={"h": "%"},
    )
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
    # the row as recorded, text and all, and nothing the source added while reading it
    assert json.loads(json.loads(dead[0])["raw"]) == {
        "ts": "not a time",
        "metric": "t",
        "value": "2.5",
    }
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


UCI_DOWNLOAD = (  # the head and tail of AirQualityUCI.csv as UCI ships it (CRLF, `;;` ends)
    "Date;Time;CO(GT);PT08.S1(CO);NMHC(GT);C6H6(GT);PT08.S2(NMHC);NOx(GT);PT08.S3(NOx);"
    "NO2(GT);PT08.S4(NO2);PT08.S5(O3);T;RH;AH;;\r\n"
    "10/03/2004;18.00.00;2,6;1360;150;11,9;1046;166;1056;113;1692;1268;13,6;48,9;0,7578;;\r\n"
    "10/03/2004;19.00.00;2;1292;112;9,4;955;103;1174;92;1559;972;13,3;47,7;0,7255;;\r\n"
    "10/03/2004;20.00.00;2,2;1402;88;9,0;939;131;1140;114;1555;1074;11,9;54,0;0,7502;;\r\n"
    "11/03/2004;04.00.00;-200;1011;14;1,3;527;21;1818;34;1197;445;10,1;60,5;0,7465;;\r\n"
    ";;;;;;;;;;;;;;;;\r\n;;;;;;;;;;;;;;;;\r\n"
)


def readme_example(after: str) -> str:
    """The first ```yaml block of README.md after the line containing ``after``."""
    text = (Path(__file__).parents[3] / "README.md").read_text()
    block = text[text.index(after) :].split("```yaml\n", 1)[1]
    return block.split("```", 1)[0]


async def test_uci_example_is_the_one_in_readme_and_reads_the_download(tmp_path: Path) -> None:
    import yaml

    assert readme_example('UCI "Air Quality"') == ReplaySource.example
    (entry,) = yaml.safe_load(ReplaySource.example)
    path = tmp_path / "AirQualityUCI.csv"
    path.write_bytes(UCI_DOWNLOAD.encode())
    src = make(tmp_path, **{**entry, "path": str(path)})
    df = pl.concat(await run(src))
    got = {(r["ts"], r["metric"]): r["value"] for r in df.to_dicts()}
    t18 = datetime(2004, 3, 10, 18, tzinfo=UTC)
    assert len({m for _, m in got}) == 13  # every gas/weather column, nothing else
    assert got[(t18, "CO(GT)")] == 2.6
    assert got[(t18, "AH")] == 0.7578
    assert got[(t18 + timedelta(hours=1), "NOx(GT)")] == 103.0
    assert (datetime(2004, 3, 11, 4, tzinfo=UTC), "CO(GT)") not in got  # -200, dropped
    assert df.height == 13 * 4 - 1
    assert not (tmp_path / "dead-letter").exists()  # the empty tail rows are not errors


# -- resuming --------------------------------------------------------------------------------

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NARROW_ROWS = [
    (0, "t", "1"),
    (1, "t", "2"),
    (1, "h", "40"),
    (2, "t", "oops"),
    (3, "t", "4"),
    (None, "t", "5"),
    (4, "h", "41"),
    (6, "t", "7"),
    (6, "h", "42"),
    (9, "t", "10"),
]
WIDE_ROWS = [
    (0, "1", "10"),
    (1, "2", "x"),
    (2, "", "12"),
    (3, "4", "13"),
    (None, "5", "14"),
    (5, "6", "15"),
    (8, "7", "16"),
]


def write_narrow(path: Path, rows: list[tuple[int | None, str, str]]) -> set[tuple[Any, ...]]:
    """A narrow CSV; returns the readings it should give, each exactly once."""
    lines, good = ["ts,metric,value"], set()
    for sec, metric, value in rows:
        ts = "garbage" if sec is None else f"2024-01-01T00:00:{sec:02d}Z"
        lines.append(f"{ts},{metric},{value}")
        if sec is not None and value != "oops":
            good.add((T0 + timedelta(seconds=sec), metric, float(value)))
    path.write_text("\n".join(lines) + "\n")
    return good


def write_wide(path: Path) -> set[tuple[Any, ...]]:
    lines, good = ["ts,a,b"], set()
    for sec, a, b in WIDE_ROWS:
        ts = "garbage" if sec is None else f"2024-01-01T00:00:{sec:02d}Z"
        lines.append(f"{ts},{a},{b}")
        if sec is not None:
            for metric, text in (("a", a), ("b", b)):
                if text != "x":
                    value = float(text) if text else None
                    good.add((T0 + timedelta(seconds=sec), metric, value))
    path.write_text("\n".join(lines) + "\n")
    return good


async def replay(
    src: ReplaySource, position: dict[str, Any] | None = None, stop_after: int | None = None
) -> tuple[list[pl.DataFrame], dict[str, Any] | None]:
    """Run a source as the runtime does (resume, open, stream); stop after some chunks, like a
    crash right after the log record of the last one; return the chunks and the last position."""
    fake = FakeTime()
    src.clock, src.sleep = fake.clock, fake.sleep
    if position is not None:
        src.resume(json.loads(json.dumps(position)))  # it went through the device log
    await src.open()
    parts: list[pl.DataFrame] = []
    last = src.position()
    gen = src.stream()
    async for part in gen:
        parts.append(part)
        last = src.position()
        if stop_after is not None and len(parts) >= stop_after:
            break
    await gen.aclose()  # type: ignore[attr-defined]
    return parts, last


def readings_of(parts: list[pl.DataFrame]) -> list[tuple[Any, ...]]:
    if not parts:
        return []
    df = pl.concat(parts)
    return list(zip(df["ts"], df["metric"], df["value"], strict=True))


def dead_letters(folder: Path) -> list[dict[str, Any]]:
    path = folder / "dead-letter" / "air.ndjson"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def case_files(tmp_path: Path, case: str) -> tuple[dict[str, Any], set[tuple[Any, ...]], int]:
    """(config, expected readings, expected dead letters) of one resume scenario."""
    if case == "narrow":
        good = write_narrow(tmp_path / "n.csv", NARROW_ROWS)
        return {"path": str(tmp_path / "n.csv"), "chunk_rows": 2}, good, 2
    if case == "wide":
        good = write_wide(tmp_path / "w.csv")
        return {"path": str(tmp_path / "w.csv"), "layout": "wide", "chunk_rows": 4}, good, 2
    folder = tmp_path / "days"
    folder.mkdir()
    good = write_narrow(folder / "2024-01-01.csv", NARROW_ROWS[:5])
    later = [(s + 20 if s is not None else None, m, v) for s, m, v in NARROW_ROWS[5:]]
    good |= write_narrow(folder / "2024-01-02.csv", later)
    return {"path": str(folder / "*.csv"), "chunk_rows": 3}, good, 2


@pytest.mark.parametrize("speed", ["max", 2])
@pytest.mark.parametrize("case", ["narrow", "wide", "glob"])
async def test_resume_at_every_chunk_boundary_gives_each_row_once(
    tmp_path: Path, case: str, speed: str | float
) -> None:
    cfg, good, bad = case_files(tmp_path, case)
    cfg["speed"] = speed
    whole, _ = await replay(make(tmp_path / "whole", **cfg))
    assert sorted(readings_of(whole), key=str) == sorted(good, key=str)
    assert len(whole) >= 3  # enough boundaries to matter
    for k in range(len(whole) + 1):
        run_dir = tmp_path / f"cut{k}"
        first, position = await replay(make(run_dir, **cfg), stop_after=k)
        second, end = await replay(make(run_dir, **cfg), position=position)
        got = readings_of(first) + readings_of(second)
        assert len(got) == len(good), f"cut after chunk {k}"
        assert set(got) == good, f"cut after chunk {k}"
        rejected = dead_letters(run_dir)
        assert len(rejected) == bad, f"cut after chunk {k}: {rejected}"
        assert end is not None and end["done"]
        # and a third start replays nothing more
        third, _ = await replay(make(run_dir, **cfg), position=end)
        assert readings_of(third) == []
        assert len(dead_letters(run_dir)) == bad


async def test_a_restarted_stream_continues_instead_of_starting_over(tmp_path: Path) -> None:
    good = write_narrow(tmp_path / "n.csv", NARROW_ROWS)
    src = make(tmp_path, path=str(tmp_path / "n.csv"), chunk_rows=2)
    await src.open()
    gen = src.stream()
    first = [await gen.__anext__()]  # type: ignore[attr-defined]
    await gen.aclose()  # type: ignore[attr-defined]  # the runtime restarts a failed stream
    rest = [part async for part in src.stream()]
    got = readings_of(first + rest)
    assert len(got) == len(good) and set(got) == good


async def test_fully_replayed_file_is_not_replayed_again_unless_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = write_narrow(tmp_path / "n.csv", NARROW_ROWS)
    cfg = {"path": str(tmp_path / "n.csv")}
    _, end = await replay(make(tmp_path, **cfg))
    with caplog.at_level("INFO", logger="collector.sources.replay"):
        again, _ = await replay(make(tmp_path, **cfg), position=end)
    assert readings_of(again) == []
    assert "fully replayed" in caplog.text and "--from-start" in caplog.text
    assert "restart: true" in caplog.text
    forced, _ = await replay(make(tmp_path, restart=True, **cfg), position=end)
    assert set(readings_of(forced)) == good and len(readings_of(forced)) == len(good)


async def test_changed_file_starts_from_the_top_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "n.csv"
    write_narrow(path, NARROW_ROWS)
    cfg = {"path": str(path), "chunk_rows": 2}
    _, position = await replay(make(tmp_path, **cfg), stop_after=2)
    assert position is not None and not position["done"]
    other = [(s, m, v.replace("1", "9")) for s, m, v in NARROW_ROWS]  # same size, new content
    good = write_narrow(path, other)
    with caplog.at_level("WARNING", logger="collector.sources.replay"):
        parts, _ = await replay(make(tmp_path, **cfg), position=position)
    assert "changed" in caplog.text
    assert set(readings_of(parts)) == good and len(readings_of(parts)) == len(good)
    shorter = write_narrow(path, NARROW_ROWS[:3])  # a shrunk file is another file too
    parts, _ = await replay(make(tmp_path, **cfg), position=position)
    assert set(readings_of(parts)) == shorter


async def test_appended_rows_are_replayed_after_a_complete_run(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    before = write_narrow(path, NARROW_ROWS[:4])
    cfg = {"path": str(path), "chunk_rows": 2}
    first, end = await replay(make(tmp_path, **cfg))
    assert set(readings_of(first)) == before and end is not None and end["done"]
    grown = write_narrow(path, NARROW_ROWS)  # same head, rows added at the end
    second, _ = await replay(make(tmp_path, **cfg), position=end)
    got = readings_of(first) + readings_of(second)
    assert len(got) == len(grown) and set(got) == grown


async def test_new_file_in_a_glob_is_replayed_done_ones_are_not(tmp_path: Path) -> None:
    folder = tmp_path / "days"
    folder.mkdir()
    day1 = write_narrow(folder / "2024-01-01.csv", NARROW_ROWS[:3])
    cfg = {"path": str(folder / "*.csv")}
    first, end = await replay(make(tmp_path, **cfg))
    assert set(readings_of(first)) == day1
    day2 = write_narrow(folder / "2024-01-02.csv", [(30, "t", "3"), (31, "t", "4")])
    second, _ = await replay(make(tmp_path, **cfg), position=end)
    assert set(readings_of(second)) == day2 and len(readings_of(second)) == 2


@pytest.mark.parametrize("decimal_comma", [False, True])
async def test_cells_blanks_markers_and_bad_text_in_a_wide_file(
    tmp_path: Path, decimal_comma: bool
) -> None:
    sep, dot = (";", ",") if decimal_comma else (",", ".")
    cells = [f" 2{dot}5 ", "NA", "", "x", "-inf", f"7{dot}0", "nan", "-"]
    lines = [f"ts{sep}a{sep}note"]
    for i, cell in enumerate(cells):
        lines.append(f"2024-01-01T00:00:0{i}Z{sep}{cell}{sep}text {i}")
    path = tmp_path / "c.csv"
    path.write_text("\n".join(lines) + "\n")
    src = make(tmp_path, path=str(path), layout="wide", separator=sep, decimal_comma=decimal_comma)
    df = pl.concat(await run(src))
    assert set(df["metric"]) == {"a"}  # `note` is text: no metric; `a` is mostly numbers
    assert df["value"].to_list() == [2.5, None, None, 7.0, None, None]
    rejected = dead_letters(tmp_path)
    assert [json.loads(r["raw"]) for r in rejected] == [  # the whole row, as recorded
        {"ts": f"2024-01-01T00:00:0{i}Z", "a": cell, "note": f"text {i}"}
        for i, cell in ((3, "x"), (4, "-inf"))
    ]
    assert "not a number" in rejected[0]["reason"] and "not finite" in rejected[1]["reason"]


async def test_parquet_infinite_value_is_rejected_the_rest_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pl.DataFrame(
        {"ts": [T0, T0 + timedelta(seconds=1)], "a": [1.0, float("inf")], "b": [2.0, 3.0]}
    ).write_parquet(path)
    df = pl.concat(await run(make(tmp_path, path=str(path), layout="wide")))
    assert sorted(zip(df["metric"], df["value"], strict=True)) == [
        ("a", 1.0),
        ("b", 2.0),
        ("b", 3.0),
    ]
    assert len(dead_letters(tmp_path)) == 1


def write_parquet_rows(path: Path, n: int, row_group_size: int) -> list[tuple[Any, ...]]:
    """A narrow Parquet file of ``n`` readings in small row groups; its readings in order."""
    df = pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=i) for i in range(n)],
            "metric": ["t"] * n,
            "value": [float(i) for i in range(n)],
        }
    )
    df.write_parquet(path, compression="zstd", row_group_size=row_group_size)
    return list(zip(df["ts"], df["metric"], df["value"], strict=True))


async def test_parquet_is_read_on_demand_and_resumes_at_every_chunk(tmp_path: Path) -> None:
    # 23 rows in row groups of 7, chunks of 2, reads of 5 chunks: no boundary lines up
    good = write_parquet_rows(tmp_path / "p.parquet", 23, row_group_size=7)
    cfg = {"path": str(tmp_path / "p.parquet"), "chunk_rows": 2}
    whole, _ = await replay(make(tmp_path / "whole", **cfg))
    assert readings_of(whole) == good  # every row once, in file order
    assert [p.height for p in whole] == [2] * 11 + [1]
    for k in range(len(whole) + 1):
        run_dir = tmp_path / f"cut{k}"
        first, position = await replay(make(run_dir, **cfg), stop_after=k)
        second, end = await replay(make(run_dir, **cfg), position=position)
        assert readings_of(first) + readings_of(second) == good, f"cut after chunk {k}"
        assert end is not None and end["done"]


async def test_damaged_parquet_row_group_costs_itself_not_the_rows_before_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    good = write_parquet_rows(path, 12_000, row_group_size=2_000)
    # garbage over the value column of row group 3 (rows 6,000-7,999): its zstd frame breaks
    column = pq.ParquetFile(path).metadata.row_group(3).column(2)
    start = (
        column.data_page_offset
        if column.dictionary_page_offset is None
        else min(column.data_page_offset, column.dictionary_page_offset)
    )
    raw = bytearray(path.read_bytes())
    raw[start + 8 : start + 8 + 200] = b"\xa5" * 200
    path.write_bytes(bytes(raw))
    # chunks of 1,000, reads of 5,000: the damaged group sits inside the second read
    parts, _ = await replay(make(tmp_path, path=str(path), chunk_rows=1_000))
    assert readings_of(parts) == good[:6_000]
    rejected = dead_letters(tmp_path)
    assert len(rejected) == 1 and "unreadable after row 6000" in rejected[0]["reason"]
    assert "unreadable after row 6000" in caplog.text
