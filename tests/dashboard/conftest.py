"""Generated lakes for the dashboard tests: the sample lake, a mixed raw/aggregate lake, a spool."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from sample_data.make_lake import aggregate_table, write_lake
from sinks._partition import split

RAW_START = datetime(2024, 6, 2, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def streamlit(
    port: int, env: dict[str, str], log_path: Path, *flags: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`streamlit run dashboards/app.py` from the repo root on ``port``, until it answers its
    health check; stopped (its whole process group) afterwards."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "dashboards/app.py",
             "--server.port", str(port), "--server.fileWatcherType", "none", *flags],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    url = f"http://127.0.0.1:{port}/_stcore/health"
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        if resp.read().strip() == b"ok":
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()}")
                time.sleep(0.2)
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def sample_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample lake exactly as ``make sample-lake`` writes it (3 days, 3 devices, 1-min aggs)."""
    root = tmp_path_factory.mktemp("sample") / "lake"
    write_lake(aggregate_table(), root)
    return root


def raw_readings(
    *, start: datetime = RAW_START, hours: int = 30, step_s: int = 5, seed: int = 3
) -> pa.Table:
    """Raw 5-second readings of two metrics (one with an unsafe name) with a ``site`` tag."""
    rng = np.random.default_rng(seed)
    n = hours * 3600 // step_s
    base = int(start.timestamp() * 1_000_000)
    ts = base + np.arange(n, dtype=np.int64) * step_s * 1_000_000
    parts = []
    for device, site in (("edge-01", "north"), ("edge-09", "south")):
        for metric in ("voltage", "air/quality"):
            values = rng.normal(230.0 if metric == "voltage" else 12.0, 2.0, n)
            values[rng.choice(n, 20, replace=False)] = np.nan  # null readings happen
            parts.append(
                pa.table(
                    {
                        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
                        "device": pa.array([device] * n),
                        "source": pa.array(["meter"] * n),
                        "metric": pa.array([metric] * n),
                        "value": pa.array(values, pa.float64(), from_pandas=True),
                        "unit": pa.array(["V" if metric == "voltage" else "ug/m3"] * n),
                        "site": pa.array([site] * n),
                    }
                )
            )
    return pa.concat_tables(parts)


def write_raw(table: pa.Table, root: Path, batch: timedelta = timedelta(hours=4)) -> int:
    """Raw readings written like the lake sink does, one file per partition per batch."""
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    batch_no = (ts - ts.min()) // int(batch.total_seconds() * 1_000_000)
    files = 0
    for number in np.unique(batch_no):
        rows = table.filter(pa.array(batch_no == number))
        batch_id = f"raw-{number:04d}"
        rows = rows.append_column(
            "record_id", pa.array([f"{batch_id}:{i}" for i in range(rows.num_rows)])
        )
        for folder, part in split(pl.DataFrame(rows), ("metric", "date")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            part.write_parquet(root / folder / f"part-{batch_id}.parquet", compression="zstd")
            files += 1
    return files


@pytest.fixture(scope="module")
def mixed_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1-minute aggregates (temperature, humidity) plus raw readings (voltage, air/quality)."""
    root = tmp_path_factory.mktemp("mixed") / "lake"
    agg = aggregate_table(
        days=2,
        metrics={"temperature": ("C", 21.0, 4.0, 0.6), "humidity": ("%", 45.0, 8.0, 1.5)},
        seed=11,
    )
    # windows of a real source hold a varying number of readings: weighting must matter
    counts = np.random.default_rng(5).integers(1, 13, agg.num_rows)
    agg = agg.set_column(agg.schema.get_field_index("count"), "count", pa.array(counts))
    write_lake(agg, root, prefix="agg")
    write_raw(raw_readings(), root)
    return root
