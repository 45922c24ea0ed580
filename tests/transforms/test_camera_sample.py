"""sample_data/camera.yaml end to end: `collector run --once` on the sample pictures, real moto.

The README walk-through as a test: the files source takes the pictures, `infer` classifies them
with the committed digits model, confident rows land in the lake, and exactly the doubtful
pictures reach the bucket, byte for byte. Skipped while the `files` source or the s3 sink's
blob upload (issue 16, the other half) is not in the tree.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from collector import registry
from sinks.s3 import S3Config

from .test_infer_s3_model import s3_admin

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "my-retraining-bucket"


def _files_source_available() -> bool:
    try:
        registry.load("sources", "files")
    except Exception:
        return False
    return "blob_key" in S3Config.model_fields


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _files_source_available(), reason="needs the files source and the s3 sink's blob upload"
    ),
]


def test_camera_sample_runs_end_to_end(tmp_path: Path, moto_endpoint: str) -> None:
    camera = tmp_path / "camera"
    shutil.copytree(ROOT / "sample_data" / "camera", camera)
    for f in camera.iterdir():  # settled long ago
        os.utime(f, (1_700_000_000, 1_700_000_000))
    s3_admin(moto_endpoint).create_bucket(Bucket=BUCKET)
    data = tmp_path / "data"
    env = {
        **os.environ,
        "DATA_DIR": str(data),
        "CAMERA_DIR": str(camera),
        "MODEL_PATH": str(ROOT / "sample_data" / "models" / "digits.onnx"),
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    env.pop("AWS_PROFILE", None)
    res = subprocess.run(
        [sys.executable, "-m", "collector.cli", "run", "sample_data/camera.yaml", "--once"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]

    pictures = sorted(p.name for p in camera.glob("*.png"))
    lake = pl.read_parquet(data / "lake" / "**" / "*.parquet", hive_partitioning=False)
    s3 = s3_admin(moto_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    parts = [k for k in keys if k.endswith(".parquet")]
    uploaded_rows = pl.concat(
        [
            pl.read_parquet(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
            for k in parts
        ]
    )
    assert lake["confidence"].min() >= 0.6
    assert uploaded_rows["confidence"].max() < 0.6
    assert uploaded_rows.height >= 4
    # every picture but the truncated one is classified exactly once, in one place or the other
    seen = sorted([*lake["file"].to_list(), *uploaded_rows["file"].to_list()])
    assert seen == [p for p in pictures if "corrupt" not in p]
    assert (
        lake.filter(pl.col("file").str.contains("digit"))["prediction"]
        == lake.filter(pl.col("file").str.contains("digit"))["file"].str.extract(r"digit(\d)")
    ).mean() >= 0.9
    # the doubtful pictures are in S3 under their predicted label, byte for byte
    images = sorted(k for k in keys if k.endswith(".png"))
    assert images == sorted(uploaded_rows["blob_key"].to_list())
    for row in uploaded_rows.iter_rows(named=True):
        assert row["blob_key"].startswith(f"retraining/{row['prediction']}/")
        body = s3.get_object(Bucket=BUCKET, Key=row["blob_key"])["Body"].read()
        assert body == (camera / row["file"]).read_bytes()
    # the truncated file is kept with its reason, and stopped nothing
    dead = [
        json.loads(line)
        for f in (data / "dead-letter").glob("*.ndjson")
        for line in f.read_text().splitlines()
    ]
    assert any("corrupt" in json.dumps(d) for d in dead)
