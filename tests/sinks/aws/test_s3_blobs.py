"""Images to S3: the s3 sink uploads the blob each row names (moto server over HTTP, no mocks).

The sink-level tests drive ``S3Sink.write`` directly with rows pointing into a real blob store;
the process tests run the real `collector run` with a `files` source on a camera folder, a
`derive` transform standing in for the image classifier (a synthetic `confidence`), and kill it
with SIGKILL while images are on their way.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import uuid
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from collector.errors import PartialWriteError, TransientSinkError
from collector.plugin import Context
from collector.runtime import blobs
from collector.runtime.blobs import BlobStore
from sinks.s3 import S3Config, S3Sink
from tests.e2e.conftest import Collector, collectors, wait_for, write_config

from .conftest import admin
from .test_s3 import fake_response

__all__ = ["collectors"]  # the fixture, for the process tests
KEY = "retraining/{prediction}/{date}/{sha256}.{ext}"


def png(seed: int, noise: int = 64) -> bytes:
    """A valid PNG whose pixels are ``noise`` random bytes (incompressible: a real size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    pixels = random.Random(seed).randbytes(noise)
    ihdr = struct.pack(">IIBBBBB", noise, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" + pixels))
        + chunk(b"IEND", b"")
    )


def versioned_bucket(url: str) -> str:
    name = f"img-{uuid.uuid4().hex[:12]}"
    s3 = admin("s3", url)
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def versions(url: str, bucket: str, prefix: str = "") -> dict[str, int]:
    """Key -> number of versions S3 holds (a second PUT of a key adds one)."""
    out: dict[str, int] = {}
    pages = admin("s3", url).get_paginator("list_object_versions")
    for page in pages.paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            out[v["Key"]] = out.get(v["Key"], 0) + 1
    return out


def get(url: str, bucket: str, key: str) -> dict[str, Any]:
    return admin("s3", url).get_object(Bucket=bucket, Key=key)


def parquet_rows(url: str, bucket: str, prefix: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key in versions(url, bucket, prefix):
        rows += pq.read_table(io.BytesIO(get(url, bucket, key)["Body"].read())).to_pylist()
    return rows


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    blobs._STORES.clear()
    d = tmp_path / "data"
    blobs.attach(d, None, Context(device="x", component="x", data_dir=d).counters)
    return d


def image_rows(data_dir: Path, tmp_path: Path, n: int) -> tuple[pl.DataFrame, list[bytes]]:
    """Rows as the files source + a classifier make them, their blobs in the store."""
    store = blobs.store_for(data_dir)
    images = [png(i) for i in range(n)]
    rows = []
    for i, data in enumerate(images):
        src = tmp_path / f"cam{i}.png"
        src.write_bytes(data)
        blob = store.put(src, hold=False)
        rows.append({
            "ts": datetime(2024, 3, 1, 12, i, tzinfo=UTC), "device": "edge-01",
            "source": "camera", "metric": "image", "value": None, "unit": None,
            "path": str(blob.path), "file": src.name, "bytes": blob.size,
            "sha256": blob.sha256, "content_type": "image/png",
            "prediction": str(i % 3), "confidence": 0.3, "record_id": f"b:{i}",
        })
    return pl.DataFrame(rows), images


def sink_for(url: str, bucket: str, data_dir: Path, **kw: Any) -> S3Sink:
    cfg = S3Config(type="s3", name="retrain", bucket=bucket, endpoint_url=url,
                   region="us-east-1", key_prefix="img", blob_column="path", blob_key=KEY, **kw)
    return S3Sink(cfg, Context(device="edge-01", component="retrain", data_dir=data_dir))


async def test_blobs_land_byte_identical_and_rows_carry_their_keys(
    moto_url: str, aws_env: None, data_dir: Path, tmp_path: Path
) -> None:
    bucket = versioned_bucket(moto_url)
    frame, images = image_rows(data_dir, tmp_path, 4)
    sink = sink_for(moto_url, bucket, data_dir)
    await sink.open()
    try:
        await sink.write(frame, "000000000000-000000000003")
    finally:
        await sink.close()
    blob_keys = versions(moto_url, bucket, "img/retraining/")
    assert len(blob_keys) == 4
    for i, data in enumerate(images):
        sha = hashlib.sha256(data).hexdigest()
        key = f"img/retraining/{i % 3}/2024-03-01/{sha}.png"
        obj = get(moto_url, bucket, key)
        assert obj["Body"].read() == data  # byte for byte
        assert obj["ContentType"] == "image/png"
        assert obj["Metadata"] == {"sha256": sha}
    rows = parquet_rows(moto_url, bucket, "img/metric=image/")
    assert sorted(r["blob_key"] for r in rows) == sorted(blob_keys)
    assert {r["file"] for r in rows} == {f"cam{i}.png" for i in range(4)}


async def test_a_retry_after_the_upload_sends_no_image_twice(
    moto_url: str, aws_env: None, data_dir: Path, tmp_path: Path
) -> None:
    """The rows' commit (the Parquet PUT) fails after the images landed: the retry HEADs each
    image, finds it with its SHA-256 and does not PUT it again (one version per key)."""
    bucket = versioned_bucket(moto_url)
    frame, images = image_rows(data_dir, tmp_path, 5)
    sink = sink_for(moto_url, bucket, data_dir, max_attempts=1)
    await sink.open()
    puts: list[str] = []

    def commit_fails(request: Any, **_: Any) -> Any:
        puts.append(request.url)
        if ".parquet" in request.url and len([u for u in puts if ".parquet" in u]) == 1:
            return fake_response(request, 503, b"<Error><Code>SlowDown</Code>"
                                 b"<Message>later</Message></Error>")
        return None

    sink.client.meta.events.register("before-send.s3.PutObject", commit_fails)
    try:
        with pytest.raises(TransientSinkError, match="SlowDown"):
            await sink.write(frame, "000000000000-000000000004")
        await sink.write(frame, "000000000000-000000000004")
    finally:
        await sink.close()
    blob_versions = versions(moto_url, bucket, "img/retraining/")
    assert len(blob_versions) == 5 and set(blob_versions.values()) == {1}
    assert sink.ctx.counters.get("s3_blobs_skipped_total", component="retrain") == 5
    assert sum(".parquet" not in u for u in puts) == 5  # each image PUT once in all
    assert len(parquet_rows(moto_url, bucket, "img/metric=image/")) == 5
    for data in images:
        sha = hashlib.sha256(data).hexdigest()
        keys = [k for k in blob_versions if sha in k]
        assert get(moto_url, bucket, keys[0])["Body"].read() == data


async def test_a_missing_or_foreign_blob_costs_only_its_row(
    moto_url: str, aws_env: None, data_dir: Path, tmp_path: Path
) -> None:
    bucket = versioned_bucket(moto_url)
    frame, _ = image_rows(data_dir, tmp_path, 3)
    Path(frame["path"][0]).unlink()  # dropped by `when_full: drop_oldest`
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 1).then(pl.lit("/etc/passwd"))
        .otherwise(pl.col("path")).alias("path")
    )
    sink = sink_for(moto_url, bucket, data_dir)
    await sink.open()
    try:
        with pytest.raises(PartialWriteError) as caught:
            await sink.write(frame, "000000000000-000000000002")
    finally:
        await sink.close()
    exc = caught.value
    assert exc.retry_rows is None
    assert exc.rejected_rows is not None
    assert sorted(exc.rejected_rows["file"].to_list()) == ["cam0.png", "cam1.png"]
    assert any("is gone" in r for r in exc.reasons)
    assert any("not a file of this collector's blob store" in r for r in exc.reasons)
    assert len(versions(moto_url, bucket, "img/retraining/")) == 1  # only the good one
    rows = parquet_rows(moto_url, bucket, "img/metric=image/")
    assert [r["file"] for r in rows] == ["cam2.png"]


def test_blob_key_template_is_checked() -> None:
    base = {"type": "s3", "bucket": "my-bucket", "blob_column": "path"}
    for bad in ("{confidence:.2f}.png", "../{sha256}", "/abs/{sha256}", "{0}.png"):
        with pytest.raises(ValueError):
            S3Config(**base, blob_key=bad)


# -- real processes -------------------------------------------------------------------------


def aws_env_vars(tmp_path: Path) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "AKIDTESTING",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def camera_config(
    tmp_path: Path, cam: Path, url: str, bucket: str, where: str | None, **sink: Any
) -> Path:
    s3: dict[str, Any] = {
        "name": "retrain", "type": "s3", "bucket": bucket, "endpoint_url": url,
        "region": "us-east-1", "max_attempts": 1, "connect_timeout": "1s",
        "blob_column": "path", "blob_key": "retraining/{date}/{sha256}.{ext}",
        "batch": {"max_rows": 5, "max_age": "200ms"},
        "spool": {"retry_base": "100ms", "retry_cap": "500ms"}, **sink,
    }
    if where:
        s3["where"] = where
    config = {
        "device": "edge-01",
        "data_dir": str(tmp_path / "data"),
        "blobs": {"sweep_every": "200ms"},
        "log": {"checkpoint_every": "200ms"},
        "sources": [{"name": "camera", "type": "files", "path": str(cam), "every": "200ms",
                     "settle": "300ms", "after": "delete", "max_files": 4}],
        # stands in for the image classifier: a confidence from the image's size
        "transforms": [{"type": "derive",
                        "columns": {"confidence": "CAST(bytes % 10 AS DOUBLE) / 10"}}],
        "sinks": [
            {"name": "lake", "type": "lake", "path": str(tmp_path / "lake"),
             "batch": {"max_age": "200ms"}},
            s3,
        ],
    }
    return write_config(tmp_path / "camera.yaml", config)


def blob_files(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "data" / "blobs"
    return list(BlobStore(folder).folder.glob("*")) if folder.exists() else []


@pytest.mark.slow
def test_only_doubtful_images_go_to_s3_and_their_blobs_go_after_delivery(
    moto_url: str, tmp_path: Path, collectors: list[Collector]
) -> None:
    bucket = versioned_bucket(moto_url)
    cam = tmp_path / "camera"
    cam.mkdir()
    images = {f"img{i:02d}.png": png(i, noise=64 + i) for i in range(12)}
    for name, data in images.items():
        (cam / name).write_bytes(data)
    doubtful = {n for n, d in images.items() if (len(d) % 10) / 10 < 0.6}
    assert 0 < len(doubtful) < len(images)
    c = Collector(camera_config(tmp_path, cam, moto_url, bucket, "confidence < 0.6"),
                  env=aws_env_vars(tmp_path))
    collectors.append(c)
    wait_for(lambda: len(versions(moto_url, bucket, "retraining/")) == len(doubtful),
             timeout=60, what="the doubtful images in S3")
    # every image taken, the camera folder emptied, and every blob deleted once delivered
    wait_for(lambda: not list(cam.iterdir()), timeout=30, what="the camera folder emptied")
    wait_for(lambda: not blob_files(tmp_path), timeout=30, what="the blobs deleted")
    assert c.alive(), c.output()
    assert c.stop() == 0, c.output()
    by_sha = {hashlib.sha256(d).hexdigest(): n for n, d in images.items()}
    uploaded = versions(moto_url, bucket, "retraining/")
    assert set(uploaded.values()) == {1}
    assert {by_sha[k.rsplit("/", 1)[1].split(".")[0]] for k in uploaded} == doubtful
    for key in uploaded:
        sha = key.rsplit("/", 1)[1].split(".")[0]
        assert get(moto_url, bucket, key)["Body"].read() == images[by_sha[sha]]
    lake = pl.read_parquet(tmp_path / "lake" / "**" / "*.parquet")
    assert sorted(lake["file"].to_list()) == sorted(images)  # confident ones as rows only


@pytest.mark.slow
def test_kill_9_between_copy_and_upload_loses_no_image_and_uploads_none_twice(
    moto_url: str, tmp_path: Path, collectors: list[Collector]
) -> None:
    bucket = versioned_bucket(moto_url)
    cam = tmp_path / "camera"
    cam.mkdir()
    images = {f"img{i:02d}.png": png(i, noise=300_000) for i in range(24)}
    for name, data in images.items():
        (cam / name).write_bytes(data)
    config = camera_config(tmp_path, cam, moto_url, bucket, None)
    env = aws_env_vars(tmp_path)
    kills = 0
    for target in (2, 7, 12, 17, 21):  # SIGKILL as the uploads pass these counts: mid-batch
        c = Collector(config, env=env)
        collectors.append(c)
        wait_for(lambda t=target, c=c: len(versions(moto_url, bucket, "retraining/")) >= t
                 or not c.alive(), timeout=90, what=f"{target} images uploaded")
        c.proc.kill()
        c.proc.wait()
        c.fh.close()
        kills += 1
    c = Collector(config, env=env)
    collectors.append(c)
    wait_for(lambda: len(versions(moto_url, bucket, "retraining/")) == len(images),
             timeout=120, what="every image in S3")
    wait_for(lambda: not list(cam.iterdir()), timeout=30, what="the camera folder emptied")
    wait_for(lambda: not blob_files(tmp_path), timeout=30, what="the blobs deleted")
    assert c.stop() == 0, c.output()
    uploaded = versions(moto_url, bucket, "retraining/")
    assert set(uploaded.values()) == {1}, uploaded  # not one image PUT twice
    by_sha = {hashlib.sha256(d).hexdigest(): n for n, d in images.items()}
    assert {by_sha[k.rsplit("/", 1)[1].split(".")[0]] for k in uploaded} == set(images)
    for key in uploaded:
        sha = key.rsplit("/", 1)[1].split(".")[0]
        assert get(moto_url, bucket, key)["Body"].read() == images[by_sha[sha]]
    assert kills == 5
    assert os.listdir(cam) == []
