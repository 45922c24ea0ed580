"""`collector run` as a user runs it: real process, real signals, real Parquet lake."""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from collector.sources.simulated import SimulatedConfig, generate
from tests.e2e.conftest import ROOT, Collector, read_lake, run_cli, wait_for, write_config

START = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def sim_source(every: float = 0.1, seed: int = 7) -> dict:
    return {
        "name": "room",
        "type": "simulated",
        "every": f"{int(every * 1000)}ms",
        "seed": seed,
        "start": START.isoformat(),
        "metrics": {"temperature": {"kind": "uniform", "min": 0, "max": 30, "unit": "C"}},
    }


def expected_windows(n_ticks: int, source: dict, window_s: float) -> dict[datetime, dict]:
    """Window aggregates recomputed with plain Python from the same seeded readings."""
    cfg = SimulatedConfig.model_validate(source)
    groups: dict[datetime, list[float]] = defaultdict(list)
    for tick in range(n_ticks):
        for row in generate(cfg, "dev-e2e", tick, START):
            ts = row["ts"]
            start = START + timedelta(seconds=((ts - START).total_seconds() // window_s) * window_s)
            groups[start].append(row["value"])
    return {
        k: {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "count": len(v)}
        for k, v in groups.items()
    }


def test_sigterm_flushes_and_windows_match_independent_computation(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    source = sim_source()
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "device": "dev-e2e",
            "data_dir": str(tmp_path / "data"),
            "sources": [source],
            "transforms": [
                {"type": "filter", "where": "value BETWEEN -40 AND 85"},
                {"type": "window", "every": "1s", "aggs": ["mean", "min", "max", "count"]},
            ],
            "sinks": [
                {
                    "name": "lake",
                    "type": "lake",
                    "path": str(tmp_path / "lake"),
                    "batch": {"max_age": "500ms"},
                }
            ],
        },
    )
    c = Collector(cfg)
    collectors.append(c)
    # a closed window reaches the lake while running, before any shutdown flush
    wait_for(
        lambda: list((tmp_path / "lake").glob("**/*.parquet")),
        timeout=60,
        what="first closed window in the lake",
    )
    time.sleep(1.0)
    t0 = time.monotonic()
    assert c.stop(signal.SIGTERM) == 0, c.output()
    assert time.monotonic() - t0 < 15, "shutdown took too long"

    lake = read_lake(tmp_path / "lake").sort("ts")
    assert lake.height >= 2
    n_ticks = int(lake["count"].sum())
    expected = expected_windows(n_ticks, source, 1.0)
    assert len(expected) == lake.height
    for row in lake.iter_rows(named=True):
        exp = expected[row["ts"]]
        assert row["count"] == exp["count"]
        assert row["mean"] == pytest.approx(exp["mean"], rel=1e-12)
        assert row["min"] == pytest.approx(exp["min"])
        assert row["max"] == pytest.approx(exp["max"])
        assert row["device"] == "dev-e2e" and row["metric"] == "temperature"
    # every window but the last was closed by event time; the last is flushed as partial
    assert lake["partial"].to_list() == [False] * (lake.height - 1) + [True]
    assert "stopping" in c.output()


def test_once_processes_one_tick_and_exits(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "device": "d1",
            "data_dir": str(tmp_path / "data"),
            "sources": [sim_source()],
            "sinks": [{"name": "lake", "type": "lake", "path": str(tmp_path / "lake")}],
        },
    )
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr
    lake = read_lake(tmp_path / "lake")
    assert lake.height == 1
    assert lake["ts"][0] == START
    assert lake["record_id"][0].endswith(":0")
    # a second --once continues from the log: one more reading, nothing replayed twice
    assert run_cli("run", str(cfg), "--once").returncode == 0
    assert read_lake(tmp_path / "lake").height == 2


@pytest.mark.parametrize("threads", [1, 3])
def test_runtime_threads_sizes_the_polars_pool(tmp_path: Path, threads: int) -> None:
    """`runtime.threads` is the pool the transforms run in (a 1-core device), not a hint."""
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "device": "d1",
            "data_dir": str(tmp_path / "data"),
            "runtime": {"threads": threads},
            "sources": [sim_source()],
            "transforms": [{"type": "python", "function": "tests.e2e.user_code:with_pool_size"}],
            "sinks": [{"name": "lake", "type": "lake", "path": str(tmp_path / "lake")}],
        },
    )
    res = run_cli("run", str(cfg), "--once", env={"POLARS_MAX_THREADS": "2"})
    assert res.returncode == 0, res.stderr
    assert read_lake(tmp_path / "lake")["pool"].to_list() == [threads]


def test_for_duration_stops_cleanly(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "device": "d1",
            "data_dir": str(tmp_path / "data"),
            "sources": [sim_source(every=0.2)],
            "sinks": [{"name": "lake", "type": "lake", "path": str(tmp_path / "lake")}],
        },
    )
    t0 = time.monotonic()
    res = run_cli("run", str(cfg), "--for", "2s")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 30
    assert read_lake(tmp_path / "lake").height >= 3


def test_second_collector_on_same_data_dir_is_refused(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "data_dir": str(tmp_path / "data"),
            "sources": [sim_source(every=1)],
            "sinks": [{"type": "console"}],
        },
    )
    c = Collector(cfg)
    collectors.append(c)
    wait_for(lambda: (tmp_path / "data" / "log").exists(), what="first collector up")
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 2
    assert "another collector is running" in res.stderr


@pytest.mark.slow
def test_make_run_config_writes_parquet_within_one_window(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    """The README's `make run`: sample_data/temp.yaml on a fresh data dir, no cloud account."""
    c = Collector(
        ROOT / "sample_data" / "temp.yaml",
        env={"DATA_DIR": str(tmp_path / "data"), "DEVICE_ID": "fresh-clone"},
    )
    collectors.append(c)
    files = wait_for(
        lambda: list((tmp_path / "data" / "lake").glob("**/*.parquet")),
        timeout=120,
        interval=1,
        what="the first 1-minute window in the lake",
    )
    assert c.alive()
    assert c.stop() == 0
    df = pl.read_parquet(files[0])
    assert df["device"][0] == "fresh-clone"
    assert df["count"][0] >= 1
    assert 0 <= df["min"][0] <= df["max"][0] <= 30
    assert os.path.basename(files[0].parent.parent) == "metric=temperature"
