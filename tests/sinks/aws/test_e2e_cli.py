"""Through the real CLI: `collector run --once` with s3 + firehose sinks on the moto server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import admin, free_port, from_ndjson

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


SOURCE = {
        "name": "room",
        "type": "simulated",
        "every": "5s",
        "seed": 7,
        "start": "2024-03-01T23:59:55Z",
        "devices": 3,
        "metrics": {
            "temperature": {"kind": "uniform", "min": 0, "max": 30, "unit": "C"},
            "pressure": {"kind": "walk", "start": 1000, "step": 0.5, "unit": "hPa"},
        },
}


def setup_aws(moto_url: str) -> tuple[str, str]:
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    stream = f"e2e-{uuid.uuid4().hex[:8]}"
    admin("s3", moto_url).create_bucket(Bucket=bucket)
    admin("firehose", moto_url).create_delivery_stream(
        DeliveryStreamName=stream,
        DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "RoleARN": "arn:aws:iam::123456789012:role/firehose",
            "BucketARN": f"arn:aws:s3:::{bucket}",
            "Prefix": "firehose/",
        },
    )
    return bucket, stream


def run_once(
    tmp_path: Path, endpoint: str, bucket: str, stream: str
) -> subprocess.CompletedProcess:
    """``collector run CONFIG --once`` in a subprocess, both AWS sinks on ``endpoint``."""
    aws = {"endpoint_url": endpoint, "region": "us-east-1", "max_attempts": 1,
           "connect_timeout": "1s"}
    config = {
        "device": "edge-e2e",
        "data_dir": str(tmp_path / "data"),
        "telemetry": {"enabled": False},
        "sources": [SOURCE],
        "sinks": [
            {"name": "lake", "type": "s3", "bucket": bucket, "key_prefix": "lake",
             "partition_by": ["device", "date"], **aws},
            {"name": "stream", "type": "firehose", "stream": stream, **aws},
        ],
    }
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "AKIDTESTING",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("AWS_PROFILE", None)
    return subprocess.run(
        [sys.executable, "-m", "collector", "run", str(path), "--once"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def expected_tick0(tick: int = 0) -> dict[tuple[str, str], float]:
    from collector.sources.simulated import SimulatedConfig, generate

    cfg = SimulatedConfig.model_validate(SOURCE)
    return {
        (r["device"], r["metric"]): r["value"]
        for r in generate(cfg, "edge-e2e", tick, datetime.now(UTC))
    }


def test_run_once_delivers_to_s3_lake_and_firehose(moto_url: str, tmp_path: Path):
    bucket, stream = setup_aws(moto_url)
    s3 = admin("s3", moto_url)
    proc = run_once(tmp_path, moto_url, bucket, stream)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    expected = expected_tick0()
    assert len(expected) == 6

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    lake_keys = sorted(k for k in keys if k.startswith("lake/"))
    assert [k.rsplit("/", 1)[0] for k in lake_keys] == [
        f"lake/device=edge-e2e-{i:03d}/date=2024-03-01" for i in range(3)
    ]
    lake_rows = []
    for key in lake_keys:
        lake_rows += pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"]
                                              .read())).to_pylist()
    assert {(r["device"], r["metric"]): r["value"] for r in lake_rows} == expected
    assert len(lake_rows) == 6
    assert {r["ts"] for r in lake_rows} == {datetime(2024, 3, 1, 23, 59, 55, tzinfo=UTC)}

    stream_blobs = [s3.get_object(Bucket=bucket, Key=k)["Body"].read()
                    for k in keys if k.startswith("firehose/")]
    stream_rows = from_ndjson(stream_blobs)
    assert {(r["device"], r["metric"]): r["value"] for r in stream_rows} == expected
    assert len(stream_rows) == 6
    assert {r["ts"] for r in stream_rows} == {"2024-03-01T23:59:55Z"}
    assert len({r["record_id"] for r in stream_rows}) == 6


def test_endpoint_down_rows_wait_in_spool_then_land_once(moto_url: str, tmp_path: Path):
    """Run 1 cannot reach AWS: exit 1, rows kept. Run 2 reaches it: the spooled batch and the
    new tick both land, each row once in the lake and once in the stream."""
    bucket, stream = setup_aws(moto_url)
    s3 = admin("s3", moto_url)
    dead = f"http://127.0.0.1:{free_port()}"
    first = run_once(tmp_path, dead, bucket, stream)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "kept in the spool" in first.stderr
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

    second = run_once(tmp_path, moto_url, bucket, stream)
    assert second.returncode == 0, second.stdout + second.stderr
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    lake_rows = []
    for key in (k for k in keys if k.startswith("lake/")):
        lake_rows += pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"]
                                              .read())).to_pylist()
    stream_rows = from_ndjson([s3.get_object(Bucket=bucket, Key=k)["Body"].read()
                               for k in keys if k.startswith("firehose/")])
    # two runs, one tick each; the simulated source resumes its tick counter (issue 12), so
    # the second run reads tick 1
    expected = [(d, m, v) for tick in (0, 1) for (d, m), v in expected_tick0(tick).items()]
    for rows in (lake_rows, stream_rows):
        assert len(rows) == 12
        assert len({r["record_id"] for r in rows}) == 12
        assert sorted((r["device"], r["metric"], r["value"]) for r in rows) == sorted(expected)
