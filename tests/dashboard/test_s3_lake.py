"""An S3 lake behind a real moto server reads exactly like the same lake on disk."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from collector.commands.export import LakeQuery, export, list_files, scan_lake
from collector.testing import moto_server
from dashboards import data


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture
def s3_lake(moto: str, sample_lake: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The sample lake uploaded under ``s3://lake-test/site-a/lake``; credentials from env."""
    import boto3

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto)  # how a user points the whole chain at it
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    bucket = f"lake-test-{tmp_path.name[-12:].lower().replace('_', '-')}"
    s3.create_bucket(Bucket=bucket)
    for path in sample_lake.rglob("*.parquet"):
        s3.upload_file(str(path), bucket, f"site-a/lake/{path.relative_to(sample_lake)}")
    return f"s3://{bucket}/site-a/lake"


def test_s3_lake_prunes_and_reads_like_the_local_lake(
    s3_lake: str, sample_lake: Path, tmp_path: Path
) -> None:
    since = datetime(2024, 6, 2, 12, tzinfo=UTC)
    until = since + timedelta(hours=18)
    remote_files = list_files(
        LakeQuery(s3_lake, since=since, until=until, metrics=("temperature",))
    )
    assert {f.folder for f in remote_files} == {
        "metric=temperature/date=2024-06-02",
        "metric=temperature/date=2024-06-03",
    }
    assert all(f.path.startswith(s3_lake + "/") for f in remote_files)
    remote = scan_lake(s3_lake, since=since, until=until, metrics=["temperature"]).collect()
    local = scan_lake(str(sample_lake), since=since, until=until, metrics=["temperature"]).collect()
    assert remote.height == local.height == 3 * 18 * 60
    assert remote.sort("record_id", "device").equals(local.sort("record_id", "device"))

    out = tmp_path / "from-s3.parquet"
    assert export(LakeQuery(s3_lake, devices=("edge-01",)), out) == 3 * 3 * 1440
    assert pl.read_parquet(out)["device"].unique().to_list() == ["edge-01"]

    stats = data.to_stats(data.lake_frame(LakeQuery(s3_lake, metrics=("pressure",))))
    assert data.bounds(stats) == (
        datetime(2024, 6, 1, tzinfo=UTC),
        datetime(2024, 6, 3, 23, 59, tzinfo=UTC),
    )


def test_page_reads_an_s3_lake(
    s3_lake: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(data.LAKE_ENV, s3_lake)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))
    app = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="source_kind").value == "S3 lake"
    assert at.text_input(key="s3_uri").value == s3_lake
    assert len(at.metric) == 9
    assert f"{s3_lake} · 2024-06-02 23:59" in at.caption[0].value
    assert "12,960 rows from 24 files" in at.caption[0].value
