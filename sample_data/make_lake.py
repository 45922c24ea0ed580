"""Deterministic generator of the small historical lake shipped in ``sample_data/lake``.

The dashboard needs something to show before a collector has run, and the tests need a lake
whose content is known. Files are written through the same partition helper as the ``lake`` sink
so the layout (``metric=…/date=…/part-<batch id>.parquet``, zstd) is exactly what the sink makes.

Run ``python -m sample_data.make_lake [OUT_DIR]`` (``make sample-lake``); the same seed and
arguments always give the same rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from sinks._partition import DEFAULT_PARTITIONS, split

SEED = 20240601
START = datetime(2024, 6, 1, tzinfo=UTC)
DEVICES = ("edge-01", "edge-02", "edge-03")
METRICS = {
    # metric: (unit, baseline, daily amplitude, noise per sample)
    "temperature": ("C", 21.0, 4.0, 0.6),
    "humidity": ("%", 45.0, 8.0, 1.5),
    "pressure": ("hPa", 1013.0, 3.0, 0.4),
}
SOURCE = "room"
SAMPLES_PER_MINUTE = 12
"""The simulated source ticks every 5 s; each 1-minute window aggregates this many readings."""


def aggregate_table(
    *,
    start: datetime = START,
    days: int = 3,
    devices: Sequence[str] = DEVICES,
    metrics: dict[str, tuple[str, float, float, float]] | None = None,
    seed: int = SEED,
    gap: tuple[str, timedelta, timedelta] | None = (
        "edge-03",
        timedelta(days=1, hours=10),
        timedelta(hours=2),
    ),
    spikes: bool = True,
) -> pa.Table:
    """1-minute window aggregates (mean/min/max/count) like the ``window`` transform emits.

    ``gap`` removes a stretch of one device's data (an outage the freshness view should show);
    ``spikes`` adds a few hot minutes so the threshold table has something to list.
    """
    metrics = metrics or METRICS
    rng = np.random.default_rng(seed)
    minutes = days * 24 * 60
    base_us = int(start.timestamp() * 1_000_000)
    ts_minutes = base_us + np.arange(minutes, dtype=np.int64) * 60_000_000
    columns: dict[str, list[np.ndarray]] = {
        k: [] for k in ("ts", "device", "metric", "unit", "mean", "min", "max", "count")
    }
    for d_index, device in enumerate(devices):
        keep = np.ones(minutes, dtype=bool)
        if gap is not None and gap[0] == device:
            first = int(gap[1].total_seconds() // 60)
            keep[first : first + int(gap[2].total_seconds() // 60)] = False
        for metric, (unit, baseline, amplitude, noise) in metrics.items():
            phase = 2 * np.pi * (np.arange(minutes) / 1440.0) + d_index * 0.7
            level = baseline + d_index * 0.5 + amplitude * np.sin(phase)
            samples = level[:, None] + rng.normal(0.0, noise, (minutes, SAMPLES_PER_MINUTE))
            if spikes and metric == "temperature":
                hot = rng.choice(minutes, size=6, replace=False)
                samples[hot] += 9.0
            columns["ts"].append(ts_minutes[keep])
            columns["device"].append(np.full(keep.sum(), device, dtype=object))
            columns["metric"].append(np.full(keep.sum(), metric, dtype=object))
            columns["unit"].append(np.full(keep.sum(), unit, dtype=object))
            columns["mean"].append(np.round(samples.mean(axis=1), 3)[keep])
            columns["min"].append(np.round(samples.min(axis=1), 3)[keep])
            columns["max"].append(np.round(samples.max(axis=1), 3)[keep])
            columns["count"].append(np.full(keep.sum(), SAMPLES_PER_MINUTE, dtype=np.int64))
    flat = {k: np.concatenate(v) for k, v in columns.items()}
    n = len(flat["ts"])
    return pa.table(
        {
            "ts": pa.array(flat["ts"], pa.timestamp("us", tz="UTC")),
            "device": pa.array(flat["device"], pa.string()),
            "source": pa.array(np.full(n, SOURCE, dtype=object), pa.string()),
            "metric": pa.array(flat["metric"], pa.string()),
            "unit": pa.array(flat["unit"], pa.string()),
            "mean": pa.array(flat["mean"], pa.float64()),
            "min": pa.array(flat["min"], pa.float64()),
            "max": pa.array(flat["max"], pa.float64()),
            "count": pa.array(flat["count"], pa.int64()),
            "partial": pa.array(np.zeros(n, dtype=bool), pa.bool_()),
        }
    )


def write_lake(
    table: pa.Table,
    root: Path,
    *,
    batch: timedelta = timedelta(hours=6),
    prefix: str = "sample",
) -> int:
    """Write ``table`` as the lake sink would, one batch per ``batch`` of event time.

    Returns the number of files written. Rows get a ``record_id`` of ``<batch id>:<row>``.
    """
    root.mkdir(parents=True, exist_ok=True)
    batch_us = int(batch.total_seconds() * 1_000_000)
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    batch_no = (ts - ts.min()) // batch_us if len(ts) else ts
    files = 0
    for number in np.unique(batch_no):
        rows = table.filter(pa.array(batch_no == number))
        first = datetime.fromtimestamp(int(rows.column("ts")[0].value) / 1e6, UTC)
        batch_id = f"{prefix}-{first:%Y%m%dT%H%M%S}"
        ids = pa.array([f"{batch_id}:{i}" for i in range(rows.num_rows)], pa.string())
        rows = rows.append_column("record_id", ids)
        for folder, part in split(pl.from_arrow(rows), DEFAULT_PARTITIONS):  # type: ignore[arg-type]
            target = root / folder
            target.mkdir(parents=True, exist_ok=True)
            part.write_parquet(target / f"part-{batch_id}.parquet", compression="zstd")
            files += 1
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the sample lake (``make sample-lake``), or write it to another folder."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "out",
        nargs="?",
        type=Path,
        default=Path(__file__).resolve().parent / "lake",
        help="target folder (default: sample_data/lake); replaced if it is a lake",
    )
    root: Path = ap.parse_args(argv).out
    if root.exists():
        strangers = [p.name for p in root.iterdir() if not p.name.startswith("metric=")]
        if strangers:
            ap.error(
                f"{root} holds more than a lake ({', '.join(strangers[:3])}): not replacing it"
            )
        shutil.rmtree(root)
    files = write_lake(aggregate_table(), root)
    size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    print(f"wrote {files} files, {size / 1e6:.2f} MB under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
