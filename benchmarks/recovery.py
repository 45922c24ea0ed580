"""How fast a backlog drains once the network is back: a 1 GB spool to S3 (moto server).

Builds a spool of raw readings for an `s3` sink with the runtime's own ``Spool.put`` (Polars
frames written as ``collector.runtime.spool.encode_file`` files: a small header and a zstd Arrow
IPC stream, each as large as the s3 sink's default batch cuts it for this device (100 devices x
2 metrics at 1 Hz for `batch.max_age`, at most `batch.max_rows`), record ids as the runtime
writes them), starts ``python -m moto.server`` on a free port, and times ``collector run CFG
--once`` on that data dir: the consumer has nothing new, the S3 worker drains the spool (Parquet
zstd, one object per partition per batch). MB/s = spool bytes on disk / seconds.

The same command is then run again on the now empty spool: its time is the fixed cost (start,
config, flush, exit), so the net drain rate is reported too.

    python -m benchmarks.recovery [--size 1GB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    check_ok,
    collector_cmd,
    fmt_bytes,
    run_measured,
    table,
    write_json,
    write_yaml,
)
from collector.testing import start_moto
from collector.units import parse_size
from sinks.s3 import S3Config

DEVICES = 100
METRICS = ("temperature", "humidity")
_BATCH = S3Config(type="s3", bucket="recovery-bench").batch
ROWS_PER_FILE = min(_BATCH.max_rows, round(DEVICES * len(METRICS) * _BATCH.max_age))
"""Rows of one spooled batch: what the s3 sink's default batch holds at 200 readings a second."""
BUCKET = "recovery-bench"
START_US = 1_717_200_000_000_000  # 2024-06-01T00:00:00Z


def build_spool(folder: Path, size: int) -> tuple[int, int, int, int]:
    """Spool files until ``size`` bytes are on disk; (files, rows, bytes on disk, Arrow bytes).

    Arrow bytes (the frames' in-memory size) stay comparable if the spool format compresses.
    """
    import numpy as np
    import polars as pl

    from collector.plugin import SpoolConfig
    from collector.runtime.spool import Spool
    from collector.schema import POLARS_SCHEMA, RECORD_ID

    spool = Spool(folder, SpoolConfig(max_bytes=size * 4), "lake")
    schema = {**POLARS_SCHEMA, RECORD_ID: pl.String()}
    rng = np.random.default_rng(7)
    per_tick = DEVICES * len(METRICS)
    i = np.arange(ROWS_PER_FILE)
    devices = pl.Series([f"dev-{(k // len(METRICS)) % DEVICES:03d}" for k in i], dtype=pl.String)
    metrics = pl.Series([METRICS[k % len(METRICS)] for k in i], dtype=pl.String)
    units = pl.Series(["C" if k % len(METRICS) == 0 else "%" for k in i], dtype=pl.String)
    source = pl.Series(["plant"] * ROWS_PER_FILE, dtype=pl.String)
    files = rows = total = arrow = 0
    offset = 0
    while total < size:
        ticks = (offset + i) // per_tick
        ts = pl.Series(START_US + ticks * 1_000_000, dtype=pl.Int64).cast(POLARS_SCHEMA["ts"])
        batch_id = f"{offset:012d}-{offset + ROWS_PER_FILE - 1:012d}"
        frame = pl.DataFrame(
            {
                "ts": ts,
                "device": devices,
                "source": source,
                "metric": metrics,
                "value": pl.Series(rng.normal(25, 5, ROWS_PER_FILE), dtype=pl.Float64),
                "unit": units,
                RECORD_ID: pl.Series([f"{batch_id}:{k}" for k in i], dtype=pl.String),
            },
            schema=schema,
        )
        spool.put(frame, batch_id)  # written as spool.encode_file(frame, created_ms)
        arrow += frame.estimated_size()
        files += 1
        rows += ROWS_PER_FILE
        total = spool.backlog_bytes
        offset += ROWS_PER_FILE
    return files, rows, total, arrow


def config(data_dir: Path, endpoint: str) -> dict[str, Any]:
    return {
        "device": "edge",
        "data_dir": str(data_dir),
        "shutdown_timeout": "1h",  # --once drains for at most this long
        "telemetry": {"enabled": False},
        "sources": [{"name": "plant", "type": "simulated", "every": "1h"}],
        "sinks": [
            {
                "name": "lake",
                "type": "s3",
                "bucket": BUCKET,
                "key_prefix": "lake",
                "endpoint_url": endpoint,
                "region": "us-east-1",
                "spool": {"max_bytes": "64GiB"},
            }
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GB", help="spool backlog size (e.g. 1GB, 100MB)")
    args = ap.parse_args(argv)
    size = int(parse_size(args.size))

    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    aws = {
        "AWS_ACCESS_KEY_ID": "AKIDBENCH",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_CONFIG_FILE": str(work / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(work / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        with start_moto(work / "moto.log") as moto:
            url = moto.url
            import boto3

            s3 = boto3.client(
                "s3",
                endpoint_url=url,
                region_name="us-east-1",
                aws_access_key_id="AKIDBENCH",
                aws_secret_access_key="bench-secret",
            )
            s3.create_bucket(Bucket=BUCKET)
            data = work / "data"
            t = time.perf_counter()
            files, rows, spool_bytes, arrow_bytes = build_spool(data / "spool" / "lake", size)
            build_s = time.perf_counter() - t
            cfg = write_yaml(work / "recovery.yaml", config(data, url))
            cmd = collector_cmd(cfg, "--once", "--log-level", "warning")
            res = run_measured(cmd, cwd=work, extra_env=aws)
            check_ok(res, "collector run (drain)")
            left = sum(p.stat().st_size for p in (data / "spool" / "lake").glob("*.arrow"))
            objects, s3_bytes = _bucket_totals(s3)
            empty = run_measured(cmd, cwd=work, extra_env=aws)
            check_ok(empty, "collector run (empty spool)")
            moto_rss = _rss_mb(moto.pid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = spool_bytes / 1e6
    net_s = max(res.wall_s - empty.wall_s, 1e-9)
    result = {
        "size_requested": args.size,
        "spool_files": files,
        "spool_rows": rows,
        "spool_bytes": spool_bytes,
        "arrow_bytes": arrow_bytes,
        "arrow_mb_per_s": round(arrow_bytes / 1e6 / res.wall_s, 1),
        "build_s": round(build_s, 1),
        "left_in_spool_bytes": left,
        "s3_objects": objects,
        "s3_bytes": s3_bytes,
        "drain": res.as_dict(),
        "fixed_cost": empty.as_dict(),
        "mb_per_s": round(mb / res.wall_s, 1),
        "net_mb_per_s": round(mb / net_s, 1),
        "rows_per_s": round(rows / res.wall_s),
        "rows_per_cpu_s": round(rows / max(res.cpu_s, 1e-9)),
        "moto_rss_mb": moto_rss,
    }
    for k in ("drain", "fixed_cost"):
        result[k].pop("stderr_tail", None)
    write_json("recovery", result)
    table(
        f"Recovery: {fmt_bytes(spool_bytes)} spool backlog ({files:,} files, {rows:,} rows) "
        "→ S3 (moto server)",
        ["measure", "value"],
        [
            (
                "drain, end to end",
                f"{res.wall_s:.1f} s → {mb / res.wall_s:.1f} MB/s "
                f"({rows / res.wall_s:,.0f} rows/s)",
            ),
            ("in-memory Arrow data rate", f"{arrow_bytes / 1e6 / res.wall_s:.1f} MB/s"),
            ("fixed cost (same run, empty spool)", f"{empty.wall_s:.1f} s"),
            ("net drain rate", f"{mb / net_s:.1f} MB/s"),
            ("collector CPU / peak RSS", f"{res.cpu_s:.1f} s / {res.peak_rss_mb:.0f} MB"),
            ("rows per collector CPU-second", f"{rows / max(res.cpu_s, 1e-9):,.0f} (≥ 1,500,000)"),
            ("S3 objects / bytes (Parquet zstd)", f"{objects:,} / {fmt_bytes(s3_bytes)}"),
            ("left in the spool", fmt_bytes(left)),
        ],
    )
    return result


def _bucket_totals(s3: Any) -> tuple[int, int]:
    n = total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            n += 1
            total += obj["Size"]
    return n, total


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
