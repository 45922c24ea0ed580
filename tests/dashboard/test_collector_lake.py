"""End to end: the real `collector run` writes a lake; the dashboard's queries read it back."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from collector.commands.export import LakeQuery, export, list_files
from dashboards import data

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2024, 3, 1, 23, 0, tzinfo=UTC)  # crosses midnight: two date partitions

pytestmark = pytest.mark.slow


def _recording(path: Path) -> pl.DataFrame:
    """Two hours of 10-second readings of two metrics, in the wide CSV a logger would write."""
    rng = np.random.default_rng(42)
    n = 2 * 360
    frame = pl.DataFrame(
        {
            "ts": [START + timedelta(seconds=10 * i) for i in range(n)],
            "temperature": np.round(20 + rng.normal(0, 1, n), 3),
            "humidity": np.round(50 + rng.normal(0, 5, n), 3),
        }
    )
    frame.write_csv(path, datetime_format="%Y-%m-%dT%H:%M:%SZ")
    return frame


def _run(config: Path, data_dir: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "collector",
            "run",
            str(config),
            "--once",
            "--data-dir",
            str(data_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _config(path: Path, csv: Path, lake: Path, window: bool) -> Path:
    transforms = (
        "transforms:\n  - type: window\n    every: 1m\n    aggs: [mean, min, max, count]\n"
        if window
        else ""
    )
    path.write_text(
        "device: edge-e2e\n"
        "telemetry: {port: 0}\n"
        f"data_dir: {path.parent / 'data'}\n"
        "sources:\n"
        f"  - name: logger\n    type: replay\n    path: {csv}\n    layout: wide\n"
        "    speed: max\n"
        f"{transforms}"
        "sinks:\n"
        f"  - name: lake\n    type: lake\n    path: {lake}\n"
    )
    return path


def test_dashboard_reads_the_lake_the_collector_wrote(tmp_path: Path) -> None:
    csv = tmp_path / "recording.csv"
    truth = _recording(csv).unpivot(index="ts", variable_name="metric", value_name="value")
    agg_lake, raw_lake = tmp_path / "agg-lake", tmp_path / "raw-lake"
    _run(_config(tmp_path / "agg.yaml", csv, agg_lake, window=True), tmp_path / "d1")
    _run(_config(tmp_path / "raw.yaml", csv, raw_lake, window=False), tmp_path / "d2")

    for lake in (agg_lake, raw_lake):
        folders = {f.folder for f in list_files(LakeQuery(str(lake)))}
        assert folders == {
            f"metric={m}/date={d}"
            for m in ("temperature", "humidity")
            for d in ("2024-03-01", "2024-03-02")
        }

    # raw lake: every reading, as recorded
    raw = data.lake_frame(LakeQuery(str(raw_lake))).collect()
    assert raw.height == truth.height
    joined = truth.join(raw.select("ts", "metric", "value"), on=["ts", "metric"], suffix="_lake")
    assert joined.height == truth.height
    assert (joined["value"] == joined["value_lake"]).all()

    # aggregate lake: 1-minute windows; the dashboard's 5-minute series equals the same
    # bucketing of the raw recording, whichever lake it reads
    start, end = START, START + timedelta(hours=2)
    want = (
        truth.with_columns(pl.col("ts").dt.truncate("5m"))
        .group_by("ts", "metric")
        .agg(
            pl.col("value").mean().alias("mean"),
            pl.col("value").min().alias("min"),
            pl.col("value").max().alias("max"),
            pl.len().cast(pl.Int64).alias("count"),
        )
        .sort("metric", "ts")
    )
    for lake in (agg_lake, raw_lake):
        stats = data.to_stats(data.lake_frame(LakeQuery(str(lake))))
        got, bucket = data.series(stats, start=start, end=end, resolution=timedelta(minutes=5))
        assert bucket == timedelta(minutes=5)
        assert got["device"].unique().to_list() == ["edge-e2e"]
        got = got.select("ts", "metric", "mean", "min", "max", "count").sort("metric", "ts")
        assert got.height == want.height == 2 * 24
        assert got["count"].to_list() == want["count"].to_list()
        assert got["min"].to_list() == want["min"].to_list()
        assert got["max"].to_list() == want["max"].to_list()
        np.testing.assert_allclose(got["mean"].to_numpy(), want["mean"].to_numpy(), rtol=1e-9)

    # collector health as the page shows it, from what the runtime wrote
    status = data.read_status(tmp_path / "d1")
    assert status is not None
    row = data.status_table(status).row(0, named=True)
    assert row["sink"] == "lake"
    assert row["delivered_rows"] == 2 * 120  # two metrics, 120 one-minute windows
    assert row["backlog_files"] == 0 and row["dropped_rows"] == 0

    # the export of one day of the aggregate lake holds that day's windows only
    out = tmp_path / "day.csv"
    n = export(LakeQuery(str(agg_lake), since=datetime(2024, 3, 2, tzinfo=UTC)), out)
    assert n == 2 * 60  # 00:00-00:59 on March 2nd, two metrics
    assert pl.read_csv(out, try_parse_dates=True)["ts"].min() == datetime(2024, 3, 2, tzinfo=UTC)
