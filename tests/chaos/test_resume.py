"""Sources resume instead of restarting; windows survive reloads and restarts (issue 12, 3-4).

Real `collector run` processes on one data dir: a replay run `--once` twice, killed with
SIGKILL mid-file, asked for `--from-start`; a simulated source with `start:` run twice; a
window carried over a SIGHUP reload and over a stop. Every test asserts on the rows that landed
in the lake (and, for windows, on what `collector export` shows): each reading exactly once,
each window once.
"""

from __future__ import annotations

import random
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collector.sources.simulated import SimulatedConfig, generate
from tests.chaos.conftest import T0, write_csv
from tests.e2e.conftest import Collector, read_lake, run_cli, wait_for, write_config

pytestmark = pytest.mark.slow


KEY = ["device", "source", "metric", "ts"]


def replay_config(
    tmp_path: Path,
    path: str,
    *,
    speed: Any = "max",
    chunk_rows: int = 1000,
    transforms: list[dict[str, Any]] | None = None,
) -> Path:
    return write_config(
        tmp_path / "c.yaml",
        {
            "device": "edge-01",
            "data_dir": str(tmp_path / "data"),
            "log": {"checkpoint_every": "300ms"},
            "sources": [
                {
                    "name": "rec",
                    "type": "replay",
                    "path": path,
                    "speed": speed,
                    "chunk_rows": chunk_rows,
                }
            ],
            "transforms": transforms or [],
            "sinks": [
                {
                    "name": "lake",
                    "type": "lake",
                    "path": str(tmp_path / "lake"),
                    "batch": {"max_rows": 500, "max_age": "200ms"},
                }
            ],
        },
    )


def once(cfg: Path, *args: str) -> str:
    res = run_cli("run", str(cfg), "--once", *args)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    return out


def lake_values(lake: Path) -> list[float]:
    df = read_lake(lake)
    return [] if df.is_empty() else sorted(df["value"].to_list())


def lake_rows(lake: Path) -> int:
    try:
        return read_lake(lake).height
    except (OSError, pl.exceptions.PolarsError):  # a file renamed away while listing
        return -1


# -- replay: resume, never twice ---------------------------------------------------------------


def test_replay_once_twice_lands_each_row_once_and_says_the_file_was_replayed(
    tmp_path: Path,
) -> None:
    csv = write_csv(tmp_path / "five.csv", 5)
    cfg = replay_config(tmp_path, str(csv))
    once(cfg)
    assert lake_values(tmp_path / "lake") == [0.0, 1.0, 2.0, 3.0, 4.0]
    second = once(cfg)
    assert "fully replayed" in second, second
    landed = read_lake(tmp_path / "lake")
    assert landed.height == 5, landed  # 5, not 10
    assert sorted(landed["value"].to_list()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert landed["record_id"].n_unique() == 5


def test_replay_killed_at_random_points_mid_file_lands_every_row_exactly_once(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    n = 5000
    lake = tmp_path / "lake"
    csv = write_csv(tmp_path / "big.csv", n)
    # 5,000 s of recording at 1,000x: about 5 s of replay, handed on in chunks of 25 rows
    cfg = replay_config(tmp_path, str(csv), speed=1000, chunk_rows=25)
    rng = random.Random(20241201)
    mid_file_kills = 0
    landed_before = 0
    for _ in range(3):
        c = Collector(cfg)
        collectors.append(c)
        wait_for(
            lambda prev=landed_before: lake_rows(lake) > prev or lake_rows(lake) >= n,
            timeout=60,
            what="replay progress",
        )
        time.sleep(rng.uniform(0.05, 1.0))
        c.proc.kill()  # SIGKILL: no flush, no checkpoint, maybe in the middle of a write
        c.proc.wait()
        c.fh.close()
        landed_before = max(lake_rows(lake), landed_before)
        if 0 < landed_before < n:
            mid_file_kills += 1
    assert mid_file_kills >= 1, "no kill landed in the middle of the file"
    once(cfg)  # finish the file
    landed = read_lake(lake)
    counts = landed.group_by("ts").len().filter(pl.col("len") != 1)
    assert counts.height == 0, f"rows not exactly once: {counts}"
    assert landed.height == n
    assert sorted(landed["value"].to_list()) == [float(i) for i in range(n)]
    assert landed["record_id"].n_unique() == n


def test_from_start_replays_the_file_again_once_more(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "five.csv", 5)
    cfg = replay_config(tmp_path, str(csv))
    once(cfg)
    once(cfg, "--from-start")
    landed = read_lake(tmp_path / "lake")
    assert landed.height == 10
    assert landed.group_by("ts").len()["len"].to_list() == [2] * 5
    assert sorted(landed["value"].to_list()) == sorted([float(i) for i in range(5)] * 2)
    assert landed["record_id"].n_unique() == 10
    # --from-start was for that run only: the next one continues (nothing left to replay)
    once(cfg)
    assert read_lake(tmp_path / "lake").height == 10


# -- replay: the device log keeps references to the file, not its rows (issue 19) --------------


def logged(data: Path) -> list[Any]:
    from collector.runtime.log import DeviceLog, Kind

    return [e for e in DeviceLog(data / "log").read(0) if e.kind in (Kind.DATA, Kind.REF)]


def test_replay_logs_file_ranges_and_rereads_them_when_the_checkpoint_is_lost(
    tmp_path: Path,
) -> None:
    n = 3000
    csv = write_csv(tmp_path / "rec.csv", n)
    cfg = replay_config(tmp_path, str(csv), chunk_rows=700)
    once(cfg)
    entries = logged(tmp_path / "data")
    refs = [e.meta["r"] for e in entries if e.meta and "r" in e.meta]
    assert all(e.frame is None for e in entries)  # no row is in the log...
    assert sum(r["hi"] - r["lo"] for r in refs) == n  # ...but a reference to every one
    first = read_lake(tmp_path / "lake")
    assert first.height == n
    # Without a checkpoint the whole log is processed again: every reference is read back
    # from the file and cut into the same batches, which overwrite their own files.
    for cp in (tmp_path / "data" / "state").glob("checkpoint*"):
        cp.unlink()
    once(cfg)
    again = read_lake(tmp_path / "lake")
    assert again.height == n
    assert sorted(again["value"].to_list()) == [float(i) for i in range(n)]
    assert sorted(again["record_id"].to_list()) == sorted(first["record_id"].to_list())


def test_a_file_changed_before_its_logged_rows_were_processed_is_reported_and_counted(
    tmp_path: Path,
) -> None:
    n = 1000
    csv = write_csv(tmp_path / "rec.csv", n)
    cfg = replay_config(tmp_path, str(csv), chunk_rows=400)
    once(cfg)
    for cp in (tmp_path / "data" / "state").glob("checkpoint*"):
        cp.unlink()
    write_csv(csv, n, first=10_000)  # same size and shape, other values: another file
    out = once(cfg)
    assert "cannot read the 400 source row(s) of rec it refers to again" in out, out
    assert "changed since its rows 0-400 were logged" in out, out
    # what was delivered before stays, once; the new content is a new file, replayed once
    landed = sorted(read_lake(tmp_path / "lake")["value"].to_list())
    assert landed == [float(i) for i in range(n)] + [float(10_000 + i) for i in range(n)]


# -- simulated: the tick counter resumes ---------------------------------------------------------


def test_simulated_with_start_never_repeats_event_times_across_runs(tmp_path: Path) -> None:
    source = {
        "name": "sim",
        "type": "simulated",
        "every": "5s",
        "seed": 9,
        "start": "2024-02-01T00:00:00Z",
        "metrics": {
            "temperature": {"kind": "uniform", "min": 0, "max": 30},
            "pressure": {"kind": "walk", "start": 1000, "step": 0.5},
        },
    }
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "device": "edge-01",
            "data_dir": str(tmp_path / "data"),
            "sources": [source],
            "sinks": [{"name": "lake", "type": "lake", "path": str(tmp_path / "lake")}],
        },
    )
    for _ in range(3):
        once(cfg)
    landed = read_lake(tmp_path / "lake")
    assert landed.group_by(["metric", "ts"]).len()["len"].max() == 1, landed
    sim = SimulatedConfig.model_validate(source)
    expected = sorted(
        (r["metric"], r["ts"], r["value"])
        for tick in range(3)
        for r in generate(sim, "edge-01", tick, T0)
    )
    got = sorted(zip(landed["metric"], landed["ts"], landed["value"], strict=True))
    assert got == expected


# -- windows across a reload and across a stop -----------------------------------------------------

WINDOW = [{"type": "window", "every": "1m", "aggs": ["count", "sum"]}]


def window_rows(lake: Path) -> pl.DataFrame:
    df = read_lake(lake)
    assert not df.is_empty(), "nothing in the lake"
    return df.sort(["ts", "partial"])


def closed_minute(lake: Path) -> bool:
    try:
        df = read_lake(lake)
    except (OSError, pl.exceptions.PolarsError):  # a file renamed away while listing
        return False
    return not df.is_empty() and df.filter(~pl.col("partial")).height > 0


def exported(tmp_path: Path, lake: Path) -> pl.DataFrame:
    out = tmp_path / "export.parquet"
    res = run_cli("export", "--lake", str(lake), "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    return pl.read_parquet(out).sort("ts")


def one_row_per_window(df: pl.DataFrame) -> list[tuple[datetime, int, float]]:
    """(window start, count, sum) per window; fails if a window has more than one row."""
    per = df.group_by(KEY).len().filter(pl.col("len") > 1)
    assert per.height == 0, f"windows with more than one row:\n{df}"
    return list(zip(df["ts"], df["count"], df["sum"], strict=True))


def test_reload_with_unchanged_transforms_keeps_one_row_per_window(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    """60 readings in minute 00:00, one at 00:01:00 that closes it; a SIGHUP (same file) while
    the replay is in the middle of the minute must not cut the minute in two rows."""
    lake = tmp_path / "lake"
    csv = write_csv(tmp_path / "minute.csv", 61)  # 00:00:00 .. 00:00:59, 00:01:00
    cfg = replay_config(tmp_path, str(csv), speed=15, chunk_rows=1, transforms=WINDOW)
    c = Collector(cfg)
    collectors.append(c)
    wait_for(lambda: "data in" in c.output(), what="collector start")
    time.sleep(1.5)  # about 20 of the 61 readings are in
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "open windows carry on" in c.output(), what="reload")
    # the rest of the replay (~4 s at 15x): 00:01:00 closes the minute, whose row then lands
    wait_for(lambda: closed_minute(lake), timeout=60, what="the minute closed")
    assert c.stop() == 0, c.output()
    assert "fully replayed" not in c.output()  # the reload came before the end of the file

    m0, m1 = T0, T0 + timedelta(minutes=1)
    expected = [(m0, 60, float(sum(range(60)))), (m1, 1, 60.0)]
    landed = window_rows(lake)
    assert one_row_per_window(landed) == expected, landed
    # the minute closed while running: complete; the last one was still open at the stop
    assert landed["partial"].to_list() == [False, True]
    assert one_row_per_window(exported(tmp_path, lake)) == expected


def test_stop_and_restart_inside_one_window_export_shows_one_row_with_the_full_count(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    lake, folder = tmp_path / "lake", tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "a.csv", 30)  # 00:00:00 .. 00:00:29
    cfg = replay_config(tmp_path, str(folder / "*.csv"), transforms=WINDOW)
    c = Collector(cfg)
    collectors.append(c)
    wait_for(lambda: "data in" in c.output(), what="collector start")
    time.sleep(2.0)  # a.csv at max speed is long replayed
    assert c.stop() == 0, c.output()
    first = window_rows(lake)
    assert first["partial"].to_list() == [True], first  # the stop came inside the minute

    # the second half of the minute and a reading that closes it arrive in a new file
    write_csv(folder / "b.csv", 31, start=T0 + timedelta(seconds=30), first=30)
    once(cfg)
    m0, m1 = T0, T0 + timedelta(minutes=1)
    expected = [(m0, 60, float(sum(range(60)))), (m1, 1, 60.0)]
    landed = window_rows(lake)
    complete = landed.filter(~pl.col("partial"))
    assert one_row_per_window(complete) == expected[:1], landed
    assert one_row_per_window(exported(tmp_path, lake)) == expected
