"""The simulated source: determinism, the demo's [0, 30] range, kinds, fleets, labels."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from pydantic import ValidationError

from collector.plugin import Context
from collector.schema import normalize
from collector.sources.simulated import SimulatedConfig, SimulatedSource, generate, walk_value

START = datetime(2024, 1, 1, tzinfo=UTC)


def make(tmp_path: Path, **cfg: Any) -> SimulatedSource:
    config = SimulatedConfig.model_validate({"name": "room", **cfg})
    return SimulatedSource(config, Context(device="d1", component="room", data_dir=tmp_path))


def read_ticks(src: SimulatedSource, n: int) -> pl.DataFrame:
    return pl.concat([src.read() for _ in range(n)])


def test_same_seed_same_values_other_seed_other_values(tmp_path: Path) -> None:
    metrics = {
        "t": {"kind": "uniform", "min": 0, "max": 30},
        "p": {"kind": "walk", "start": 1000, "step": 0.5},
        "v": {"kind": "sine", "period": "60s", "noise": 0.05},
    }
    a = read_ticks(make(tmp_path, seed=42, start=START.isoformat(), metrics=metrics), 50)
    b = read_ticks(make(tmp_path, seed=42, start=START.isoformat(), metrics=metrics), 50)
    c = read_ticks(make(tmp_path, seed=43, start=START.isoformat(), metrics=metrics), 50)
    assert a.equals(b)
    assert a.height == 150
    assert not a["value"].equals(c["value"])


def test_talk_demo_temperature_stays_in_0_30_and_covers_it(tmp_path: Path) -> None:
    src = make(tmp_path, seed=7, metrics={"temperature": {"min": 0, "max": 30, "unit": "C"}})
    df = read_ticks(src, 2000)
    values = df["value"]
    assert values.min() >= 0 and values.max() <= 30  # type: ignore[operator]
    assert values.min() < 1 and values.max() > 29  # type: ignore[operator]
    assert 13 < values.mean() < 17  # type: ignore[operator]
    assert set(df["unit"]) == {"C"}


def test_default_config_is_the_demo(tmp_path: Path) -> None:
    src = make(tmp_path)
    assert src.config.every == 5.0
    rows = src.read().to_dicts()
    assert [r["metric"] for r in rows] == ["temperature"]
    assert 0 <= rows[0]["value"] <= 30


def test_read_matches_the_pure_function_and_event_time(tmp_path: Path) -> None:
    cfg = {"seed": 3, "every": "10s", "start": "2024-01-01T00:00:00Z",
           "metrics": {"p": {"kind": "walk", "start": 100, "step": 2}}}
    src = make(tmp_path, **cfg)
    frames = [src.read() for _ in range(20)]
    config = SimulatedConfig.model_validate({"name": "room", **cfg})
    for tick in (0, 7, 19):
        (row,) = generate(config, "d1", tick, datetime.now(UTC))
        got = frames[tick].to_dicts()[0]
        assert got["value"] == pytest.approx(row["value"], abs=0)
        assert got["ts"] == START + timedelta(seconds=10 * tick) == row["ts"]


def test_walk_is_a_walk_and_cache_does_not_change_it(tmp_path: Path) -> None:
    config = SimulatedConfig.model_validate(
        {"seed": 1, "metrics": {"p": {"kind": "walk", "start": 1000, "step": 0.5}}}
    )
    cache: dict[tuple[int, str], tuple[int, float]] = {}
    seq = [walk_value(config, 0, "p", t, cache) for t in range(200)]
    assert seq[0] == 1000
    steps = [abs(b - a) for a, b in itertools.pairwise(seq)]
    assert max(steps) <= 0.5 and max(steps) > 0.3
    assert walk_value(config, 0, "p", 150) == pytest.approx(seq[150], abs=1e-9)


def test_sine_without_noise_is_exact(tmp_path: Path) -> None:
    config = SimulatedConfig.model_validate(
        {"every": "5s", "metrics": {"v": {"kind": "sine", "period": "60s", "amplitude": 2,
                                          "offset": 10}}}
    )
    for tick in range(13):
        (row,) = generate(config, "d", tick, START)
        assert row["value"] == pytest.approx(10 + 2 * math.sin(2 * math.pi * tick * 5 / 60))


def test_fleet_devices_are_named_and_survive_normalize(tmp_path: Path) -> None:
    src = make(tmp_path, devices=3, metrics={"t": {}, "h": {"min": 20, "max": 80}})
    data = src.read()
    df = normalize(data, device="d1", source="room", now=START)
    assert sorted(set(df["device"])) == ["d1-000", "d1-001", "d1-002"]
    assert df.height == 6
    assert set(df["source"]) == {"room"}
    # Device index, not wall time, drives the values: devices differ from one another.
    per_dev = df.filter(pl.col("metric") == "t").sort("device")["value"].to_list()
    assert len(set(per_dev)) == 3


def test_anomalies_are_labelled_and_shifted(tmp_path: Path) -> None:
    src = make(tmp_path, seed=5, label_anomalies=True, anomalies={"rate": 0.1, "magnitude": 8},
               metrics={"t": {"min": 0, "max": 30}})
    df = normalize(read_ticks(src, 3000), device="d1", source="room", now=START,
                   tags=src.config.tags)
    assert "anomaly" in df.columns
    labelled = df.filter(pl.col("anomaly") == "1")
    assert 0.07 < labelled.height / df.height < 0.13
    # 8 x (30 / sqrt 12) ~ 69: every anomaly leaves the normal range, nothing else does.
    outside = (pl.col("value") < 0) | (pl.col("value") > 30)
    assert labelled.filter(~outside).height == 0
    assert df.filter(pl.col("anomaly") == "0").filter(outside).height == 0
    assert labelled.filter(pl.col("value") < 0).height > 0
    assert labelled.filter(pl.col("value") > 30).height > 0


def test_dropouts_remove_readings(tmp_path: Path) -> None:
    src = make(tmp_path, seed=9, dropouts={"rate": 0.2}, metrics={"t": {}})
    n = read_ticks(src, 2000).height
    assert 1500 < n < 1700


def test_config_errors() -> None:
    with pytest.raises(ValidationError, match="step"):
        SimulatedConfig.model_validate({"metrics": {"t": {"kind": "uniform", "step": 1}}})
    with pytest.raises(ValidationError, match="above max"):
        SimulatedConfig.model_validate({"metrics": {"t": {"min": 5, "max": 1}}})
    with pytest.raises(ValidationError):
        SimulatedConfig.model_validate({"devices": 0})
    with pytest.raises(ValidationError):
        SimulatedConfig.model_validate({"bogus": 1})
    cron = SimulatedConfig.model_validate({"cron": "* * * * *"})
    assert cron.every is None
    with pytest.raises(ValidationError, match="need `every`"):
        SimulatedConfig.model_validate({"cron": "* * * * *", "start": "2024-01-01T00:00:00Z"})


def _json_roundtrip(position: Any) -> Any:
    import json

    return json.loads(json.dumps(position))  # what the device log stores and gives back


@pytest.mark.parametrize("stop_after", [0, 1, 7])
def test_resume_continues_the_ticks_event_times_never_repeat(
    tmp_path: Path, stop_after: int
) -> None:
    cfg = {
        "seed": 3,
        "every": "10s",
        "start": START.isoformat(),
        "devices": 2,
        "metrics": {
            "t": {"kind": "uniform"},
            "p": {"kind": "walk", "start": 1000, "step": 0.5},
            "v": {"kind": "sine", "period": "60s", "noise": 0.05},
        },
    }
    whole = read_ticks(make(tmp_path, **cfg), 12)
    first = make(tmp_path, **cfg)
    before = [first.read() for _ in range(stop_after)]
    position = _json_roundtrip(first.position())
    second = make(tmp_path, **cfg)
    second.resume(position)  # the runtime calls resume() before open()
    after = [second.read() for _ in range(12 - stop_after)]
    joined = pl.concat(before + after)
    assert joined.equals(whole)  # same values, walks included: nothing repeated or skipped
    keys = joined.select("ts", "device", "metric")
    assert keys.n_unique() == keys.height
    assert joined["ts"].max() == START + timedelta(seconds=110)


def test_resume_with_another_start_begins_a_new_timeline(tmp_path: Path) -> None:
    first = make(tmp_path, every="1s", start=START.isoformat())
    for _ in range(5):
        first.read()
    position = _json_roundtrip(first.position())
    assert position["tick"] == 5
    later = START + timedelta(days=1)
    moved = make(tmp_path, every="1s", start=later.isoformat())
    moved.resume(position)
    assert moved.read()["ts"].to_list() == [later]
    slower = make(tmp_path, every="2s", start=START.isoformat())
    slower.resume(position)
    assert slower.read()["ts"].to_list() == [START]


def test_clock_timed_simulation_has_no_position(tmp_path: Path) -> None:
    src = make(tmp_path)
    src.read()
    assert src.position() is None
    src.resume({"tick": 99, "start": None, "every": 5.0})
    assert src.tick == 1  # clock times never repeat anyway: nothing to resume
