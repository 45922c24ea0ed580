"""The plugins through the real CLI: `collector run --once` and `collector check` subprocesses."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from collector.sources.simulated import SimulatedConfig, generate

REPO = Path(__file__).resolve().parents[3]


def collector(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "collector", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    config = {"device": "edge-7", "telemetry": {"enabled": False}, **config}
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def uci_file(path: Path) -> dict[tuple[datetime, str], list[float]]:
    """Two hours of 5-minute readings; returns the kept values per (minute window, metric)."""
    lines = ["Date;Time;CO;T"]
    kept: dict[tuple[datetime, str], list[float]] = {}
    start = datetime(2004, 3, 10, 18)
    for i in range(24):
        t = start + timedelta(minutes=5 * i)
        co = -200.0 if i % 4 == 0 else round(1 + i / 10, 1)
        temp = 150.0 if i == 7 else round(10 + i / 4, 2)  # 150 fails the filter
        lines.append(f"{t:%d/%m/%Y};{t:%H.%M.%S};{co};{temp}")
        window = t.replace(minute=(t.minute // 15) * 15, tzinfo=UTC)
        if co != -200.0:
            kept.setdefault((window, "CO"), []).append(co)
        if temp <= 85:
            kept.setdefault((window, "T"), []).append(temp)
    path.write_text("\n".join(lines) + "\n")
    return kept


@pytest.mark.slow
def test_replay_filter_window_lake_console(tmp_path: Path) -> None:
    kept = uci_file(tmp_path / "air.csv")
    config = write_config(tmp_path, {
        "sources": [{"name": "air", "type": "replay", "path": str(tmp_path / "air.csv"),
                     "separator": ";", "time_column": ["Date", "Time"],
                     "time_format": "%d/%m/%Y %H.%M.%S", "layout": "wide",
                     "missing_values": [-200], "drop_missing": True, "speed": "max",
                     "chunk_rows": 7, "units": {"T": "C"}}],
        "transforms": [{"type": "filter", "where": "value BETWEEN -40 AND 85"},
                       {"type": "window", "every": "15m", "aggs": ["mean", "min", "max",
                                                                   "count", "p95"]}],
        "sinks": [{"name": "lake", "type": "lake", "path": str(tmp_path / "lake")},
                  {"name": "screen", "type": "console", "where": "metric = 'T'"}],
    })
    checked = collector("check", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    done = collector("run", str(config), "--once", "--data-dir", str(tmp_path / "data"),
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lake = pl.read_parquet(str(tmp_path / "lake") + "/**/*.parquet", hive_partitioning=True)
    got = {(r["ts"], r["metric"]): r for r in lake.to_dicts()}
    assert set(got) == set(kept)
    last_window = max(w for w, _ in kept)
    for key, vals in kept.items():
        row = got[key]
        assert row["device"] == "edge-7" and row["source"] == "air"
        assert row["count"] == len(vals)
        assert row["mean"] == pytest.approx(statistics.fmean(vals))
        assert (row["min"], row["max"]) == (min(vals), max(vals))
        p95 = statistics.quantiles(vals, n=100, method="inclusive")[94] if len(vals) > 1 \
            else vals[0]
        assert row["p95"] == pytest.approx(p95)
        assert row["partial"] is (key[0] == last_window)  # only the flushed one is partial
        assert row["unit"] == ("C" if key[1] == "T" else None)
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(p["ts"] for p in printed) == sorted(
        k[0].isoformat() for k in kept if k[1] == "T")
    assert {p["metric"] for p in printed} == {"T"}


@pytest.mark.slow
def test_simulated_once_lands_the_recomputable_values(tmp_path: Path) -> None:
    source = {"name": "room", "type": "simulated", "seed": 42, "every": "5s",
              "start": "2024-01-01T00:00:00Z", "devices": 3,
              "metrics": {"temperature": {"kind": "uniform", "min": 0, "max": 30, "unit": "C"},
                          "pressure": {"kind": "walk", "start": 1000, "step": 0.5}}}
    config = write_config(tmp_path, {
        "sources": [source],
        "sinks": [{"name": "lake", "type": "lake", "path": str(tmp_path / "lake"),
                   "partition_by": ["device", "date"]}],
    })
    done = collector("run", str(config), "--once", "--data-dir", str(tmp_path / "data"),
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lake = pl.read_parquet(str(tmp_path / "lake") + "/**/*.parquet", hive_partitioning=True)
    want = generate(SimulatedConfig.model_validate(source), "edge-7", 0, datetime.now(UTC))
    got = sorted((r["device"], r["metric"], r["value"]) for r in lake.to_dicts())
    assert got == sorted((w["device"], w["metric"], w["value"]) for w in want)
    assert lake["ts"].unique().to_list() == [datetime(2024, 1, 1, tzinfo=UTC)]
    assert all(0 <= v <= 30 for d, m, v in got if m == "temperature")
    assert not math.isnan(sum(v for _, _, v in got))


def test_check_reports_bad_sql_with_its_location(tmp_path: Path) -> None:
    config = write_config(tmp_path, {
        "sources": [{"name": "room", "type": "simulated"}],
        "transforms": [{"type": "sql", "query": "SELEC * FROM self"},
                       {"type": "window", "every": "1m", "aggs": ["mean", "bogus"]}],
        "sinks": [{"name": "lake", "type": "lake", "partition_by": ["metric", "../x"]}],
    })
    checked = collector("check", str(config), cwd=tmp_path)
    assert checked.returncode == 2
    out = checked.stdout + checked.stderr
    assert "transforms[0].query" in out and "invalid SQL query" in out
    assert "transforms[1].aggs" in out
    assert "sinks[0].partition_by" in out


def test_check_type_checks_the_chain_on_empty_frames(tmp_path: Path) -> None:
    config = write_config(tmp_path, {
        "sources": [{"name": "room", "type": "simulated"}],
        "transforms": [{"type": "window", "every": "1m"},
                       {"type": "filter", "where": "value > 3"}],  # windows have no `value`
        "sinks": [{"name": "lake", "type": "lake", "where": "mean > 1"}],
    })
    checked = collector("check", str(config), cwd=tmp_path)
    assert checked.returncode == 2
    assert "transforms[1]" in checked.stdout + checked.stderr
    config.write_text(config.read_text().replace("value > 3", "count > 3"))
    checked = collector("check", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
