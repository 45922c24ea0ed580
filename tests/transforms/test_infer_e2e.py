"""Edge inference through the real CLI: doubtful rows to S3 (moto) for retraining, rest to lake.

`collector run --once` in a subprocess replays recorded readings through an `infer` transform
with a model trained here; the test reads back what landed in the bucket and in the lake.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from collector.models.features import feature_frame, feature_names
from collector.transforms.infer import FeaturesConfig

from .conftest import labelled_readings
from .test_infer_models import FEATURES, train_forest

ROOT = Path(__file__).resolve().parents[2]
KEY = ["device", "ts"]

CONFIG = """\
device: edge-01
data_dir: {data}
telemetry: {{enabled: false}}
sources:
  - name: feed
    type: replay
    path: {data}/readings.parquet
    device_column: device
    speed: max
transforms:
  - type: infer
    model: {{kind: sklearn, path: {model}}}
    features: {{metrics: [temperature], lags: [1], rolling: [10]}}
    window_column: window_values
sinks:
  - name: retraining
    type: s3
    bucket: retraining-data
    key_prefix: retraining
    region: us-east-1
    endpoint_url: {endpoint}
    where: "confidence < 0.6"
  - name: lake
    type: lake
    path: {data}/lake
    where: "confidence >= 0.6"
"""


def aws_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    })
    env.pop("AWS_PROFILE", None)
    return env


def collector_run(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", "run", str(config), "--once"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )


def bucket_rows(endpoint: str, bucket: str, prefix: str) -> tuple[list[str], pl.DataFrame]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    frames = [pl.read_parquet(io.BytesIO(s3.get_object(Bucket=bucket, Key=k)["Body"].read()))
              for k in keys if k.startswith(prefix)]
    return keys, pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


@pytest.mark.slow
def test_doubtful_rows_go_to_s3_for_retraining_the_rest_to_the_lake(
    tmp_path: Path, moto_endpoint: str
) -> None:
    import boto3

    model = train_forest(tmp_path / "forest.joblib")
    readings = labelled_readings(seed=11, per_device=600)
    readings.select("ts", "device", "metric", "value", "unit").write_parquet(
        tmp_path / "readings.parquet")
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing",
                 ).create_bucket(Bucket="retraining-data")
    config = tmp_path / "infer.yaml"
    config.write_text(CONFIG.format(data=tmp_path, model=tmp_path / "forest.joblib",
                                    endpoint=moto_endpoint))

    done = collector_run(config, aws_env(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr

    keys, uploaded = bucket_rows(moto_endpoint, "retraining-data", "retraining/")
    assert keys and all(k.startswith("retraining/") for k in keys)
    lake = pl.read_parquet(tmp_path / "lake" / "**" / "*.parquet", hive_partitioning=True)

    # What the model says offline about the same readings, with the same feature code.
    spec = FeaturesConfig.model_validate(FEATURES)
    names = feature_names(spec)
    offline = feature_frame(readings, spec)
    complete = offline.filter(pl.all_horizontal(pl.col(names).is_not_null()))
    proba = model.predict_proba(complete.select(names).to_numpy()).max(axis=1)
    confidence = offline.select(KEY).join(
        complete.select(KEY).with_columns(pl.Series("expected", proba)), on=KEY, how="left"
    ).with_columns(pl.col("expected").fill_null(0.0))  # unscored rows are unsure
    doubtful = confidence.filter(pl.col("expected") < 0.6)
    assert doubtful.height > 10 and doubtful.height < readings.height // 4

    # Every reading landed exactly once, on the side its confidence decides.
    assert uploaded.height == doubtful.height
    assert uploaded.select(KEY).sort(KEY).equals(doubtful.select(KEY).sort(KEY))
    assert lake.height == readings.height - doubtful.height
    assert (uploaded["confidence"] < 0.6).all() and (lake["confidence"] >= 0.6).all()
    both = pl.concat([uploaded.select(KEY), lake.select(KEY)])
    assert both.sort(KEY).equals(readings.select(KEY).sort(KEY))

    # The retraining rows carry the raw window the features came from: 10 readings + their own.
    raw = readings.sort(KEY).group_by("device", maintain_order=True).agg("ts", "value")
    series = {r["device"]: dict(zip(r["ts"], range(len(r["ts"])), strict=True)) | {
        "values": r["value"]} for r in raw.to_dicts()}
    for row in uploaded.to_dicts():
        s = series[row["device"]]
        i = s[row["ts"]]
        assert row["window_values"] == pytest.approx(s["values"][max(0, i - 10): i + 1])

    # And the anomalies were flagged wherever the rows went.
    verdicts = pl.concat([uploaded.select(*KEY, "prediction"), lake.select(*KEY, "prediction")])
    truth = readings.join(verdicts, on=KEY)
    clear = truth.filter(pl.col("magnitude") >= 6)
    assert clear.height >= 10 and (clear["prediction"] == 1.0).mean() >= 0.9


def test_bad_model_file_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "forest.joblib").write_bytes(b"not a model at all")
    labelled_readings(seed=12, per_device=20).select(
        "ts", "device", "metric", "value", "unit").write_parquet(tmp_path / "readings.parquet")
    config = tmp_path / "infer.yaml"
    config.write_text(CONFIG.format(data=tmp_path, model=tmp_path / "forest.joblib",
                                    endpoint="http://127.0.0.1:9"))
    done = collector_run(config, aws_env(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot load model" in done.stderr and "forest.joblib" in done.stderr
    assert not list(tmp_path.glob("lake/**/*.parquet"))  # nothing ran half-way
