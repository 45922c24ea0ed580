"""The s3 sink against a real moto server over HTTP: Parquet back out, partitions, faults."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from botocore.awsrequest import AWSResponse
from pydantic import ValidationError

from collector.errors import PartialWriteError, PermanentSinkError, TransientSinkError
from collector.plugin import Context
from sinks.s3 import S3Config, S3Sink

from .conftest import SCHEMA, Outage, admin, deliver, readings


def objects(url: str, bucket: str, prefix: str = "") -> dict[str, bytes]:
    s3 = admin("s3", url)
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def rows_of(blobs: dict[str, bytes]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for blob in blobs.values():
        out += pq.read_table(io.BytesIO(blob)).to_pylist()
    return out


def key_of(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in SCHEMA)


def sink_for(url: str, bucket: str, ctx: Context, **kw: Any) -> S3Sink:
    cfg = S3Config(type="s3", name="lake", bucket=bucket, endpoint_url=url, region="us-east-1",
                   **kw)
    return S3Sink(cfg, ctx)


async def test_parquet_objects_with_hive_partitions(moto_url: str, bucket: str, ctx: Context):
    table = readings(70, step=timedelta(minutes=2))  # 23:00 .. 01:18: two dates
    sink = sink_for(moto_url, bucket, ctx, key_prefix="/lake/readings/")
    await sink.open()
    try:
        await sink.write(table, "000000000000-000000000069")
    finally:
        await sink.close()

    blobs = objects(moto_url, bucket)
    expected_folders = {
        f"metric={m}/date={d}"
        for m, d in {
            (r["metric"], r["ts"].strftime("%Y-%m-%d")) for r in table.to_dicts()
        }
    }
    assert len(expected_folders) == 4  # two metrics x two dates
    assert set(blobs) == {
        f"lake/readings/{f}/part-000000000000-000000000069.parquet" for f in expected_folders
    }
    for key, blob in blobs.items():
        t = pq.read_table(io.BytesIO(blob))
        assert t.schema.names == list(SCHEMA)
        assert pl.read_parquet(io.BytesIO(blob)).schema == pl.Schema(SCHEMA)
        meta = pq.ParquetFile(io.BytesIO(blob)).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
        metric = key.split("metric=")[1].split("/")[0]
        date = key.split("date=")[1].split("/")[0]
        assert set(t.column("metric").to_pylist()) == {metric}
        assert {ts.strftime("%Y-%m-%d") for ts in t.column("ts").to_pylist()} == {date}
    assert sorted(map(key_of, rows_of(blobs))) == sorted(map(key_of, table.to_dicts()))


async def test_custom_partitions_storage_class_and_sse(moto_url: str, bucket: str, ctx: Context):
    table = readings(24, devices=("edge-01", "../evil"), step=timedelta(minutes=7))
    sink = sink_for(moto_url, bucket, ctx, partition_by=["device", "date", "hour"],
                    storage_class="STANDARD_IA", sse="AES256")
    await sink.open()
    await sink.write(table, "b1")
    await sink.close()
    blobs = objects(moto_url, bucket)
    assert all(k.startswith(("device=edge-01/", "device=..%2Fevil/")) for k in blobs), blobs
    assert any("/hour=23/" in k for k in blobs) and any("/hour=00/" in k for k in blobs)
    head = admin("s3", moto_url).head_object(Bucket=bucket, Key=next(iter(blobs)))
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["ServerSideEncryption"] == "AES256"
    assert sorted(map(key_of, rows_of(blobs))) == sorted(map(key_of, table.to_dicts()))


async def test_kms_encryption_headers(moto_url: str, bucket: str, ctx: Context):
    kms = admin("kms", moto_url)
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    sink = sink_for(moto_url, bucket, ctx, sse="aws:kms", sse_kms_key_id=key_id)
    await sink.open()
    await sink.write(readings(4), "b1")
    await sink.close()
    key = next(iter(objects(moto_url, bucket)))
    head = admin("s3", moto_url).head_object(Bucket=bucket, Key=key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert key_id in head["SSEKMSKeyId"]


async def test_replay_overwrites_instead_of_duplicating(moto_url: str, bucket: str, ctx: Context):
    table = readings(50)
    sink = sink_for(moto_url, bucket, ctx)
    await sink.open()
    for _ in range(3):
        await sink.write(table, "000000000000-000000000049")
    await sink.close()
    rows = rows_of(objects(moto_url, bucket))
    assert len(rows) == 50
    assert sorted(map(key_of, rows)) == sorted(map(key_of, table.to_dicts()))


async def test_multipart_upload_for_large_files(moto_url: str, bucket: str, ctx: Context):
    import numpy as np

    n = 900_000  # random float64 values do not compress: > 5 MiB of Parquet
    rnd = np.random.default_rng(1)
    table = pl.DataFrame(
        {
            "ts": pl.Series(np.arange(n, dtype="int64") * 1000 + 1_704_067_200_000_000)
            .cast(SCHEMA["ts"]),
            "device": ["edge-01"] * n,
            "source": ["room"] * n,
            "metric": ["vibration"] * n,
            "value": rnd.random(n),
            "unit": pl.Series([None] * n, dtype=pl.String),
            "record_id": [f"b:{i}" for i in range(n)],
        },
        schema=SCHEMA,
    )
    sink = sink_for(moto_url, bucket, ctx, multipart_threshold="5MiB",
                    multipart_part_size="5MiB")
    calls: list[str] = []
    await sink.open()
    sink.client.meta.events.register(
        "before-send.s3.UploadPart", lambda request, **_: calls.append(request.url)
    )
    await sink.write(table, "big")
    await sink.close()
    blobs = objects(moto_url, bucket)
    (blob,) = blobs.values()
    assert len(blob) > 5 * 1024**2
    assert len(calls) >= 2  # really went in parts
    back = pq.read_table(io.BytesIO(blob))
    assert back.num_rows == n
    assert back.column("value").to_pylist() == table.get_column("value").to_list()
    head = admin("s3", moto_url).head_object(Bucket=bucket, Key=next(iter(blobs)))
    assert "-" in head["ETag"]  # multipart ETags end in -<parts>


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self) -> bytes:
        return self.body


def fake_response(request: Any, status: int, body: bytes, headers: dict[str, str] | None = None):
    from aiobotocore.awsrequest import AioAWSResponse

    resp: AWSResponse = AioAWSResponse(request.url, status, headers or {}, _Raw(body))
    return resp


async def test_faults_every_reading_lands_exactly_once(moto_url: str, bucket: str, ctx: Context):
    """500s, SlowDown and a failure after some partitions landed: retries overwrite."""
    table = readings(60)
    sink = sink_for(moto_url, bucket, ctx, partition_by=["metric", "date"], max_attempts=2)
    await sink.open()
    state = {"puts": 0}
    plan = iter(["ok", "500", "500", "slowdown", "slowdown", "ok", "ok", "500", "500"])

    def flaky(request: Any, **_: Any) -> Any:
        state["puts"] += 1
        step = next(plan, "ok")
        if step == "500":
            return fake_response(request, 500, b"<Error><Code>InternalError</Code>"
                                 b"<Message>boom</Message></Error>")
        if step == "slowdown":
            return fake_response(request, 503, b"<Error><Code>SlowDown</Code>"
                                 b"<Message>reduce</Message></Error>")
        return None

    sink.client.meta.events.register("before-send.s3.PutObject", flaky)
    seen = await deliver(sink, table, "000000000000-000000000059")
    await sink.close()
    # the first object landed before the 500s: only the other partition is retried
    assert any(s.startswith("partial") for s in seen), seen
    assert len(seen) >= 2, seen
    rows = rows_of(objects(moto_url, bucket))
    assert sorted(map(key_of, rows)) == sorted(map(key_of, table.to_dicts()))


async def test_endpoint_down_for_a_while(moto_url: str, bucket: str, ctx: Context):
    """Same sink, same config: writes fail while nothing listens, then land once."""
    table = readings(20)
    outage = Outage(moto_url)
    sink = sink_for(outage.url, bucket, ctx, max_attempts=1, connect_timeout=1)
    await sink.open()
    for _ in range(3):
        with pytest.raises(TransientSinkError):
            await sink.write(table, "b1")
    assert objects(moto_url, bucket) == {}
    await outage.up()
    await sink.write(table, "b1")
    await outage.down()  # and down again mid-life: a new failure, nothing half-written counts
    with pytest.raises(TransientSinkError):
        await sink.write(readings(6, "b2"), "b2")
    await outage.up()
    await deliver(sink, readings(6, "b2"), "b2")
    await sink.close()
    await outage.down()
    rows = rows_of(objects(moto_url, bucket))
    expected = table.to_dicts() + readings(6, "b2").to_dicts()
    assert sorted(map(key_of, rows)) == sorted(map(key_of, expected))


async def test_missing_bucket_is_transient_and_other_4xx_permanent(
    moto_url: str, aws_env: None, ctx: Context
):
    sink = sink_for(moto_url, "no-such-bucket-here", ctx)
    await sink.open()
    with pytest.raises(TransientSinkError, match="NoSuchBucket"):
        await sink.write(readings(3), "b1")

    def invalid(request: Any, **_: Any) -> Any:
        return fake_response(request, 400, b"<Error><Code>InvalidArgument</Code>"
                             b"<Message>bad</Message></Error>")

    sink.client.meta.events.register("before-send.s3.PutObject", invalid)
    # every object refused for good: every row to the dead letter, none retried
    with pytest.raises(PartialWriteError) as caught:
        await sink.write(readings(3), "b1")
    assert caught.value.retry_rows is None
    assert caught.value.rejected_rows is not None and caught.value.rejected_rows.height == 3
    assert all("InvalidArgument" in r for r in caught.value.reasons)
    with pytest.raises(PermanentSinkError, match="InvalidArgument"):  # one object: one reason
        await sink.write(readings(1), "b1")
    await sink.close()


def test_config_validation():
    with pytest.raises(ValidationError, match="sse_kms_key_id needs"):
        S3Config(type="s3", bucket="abc", sse_kms_key_id="k")
    with pytest.raises(ValidationError, match="multipart_part_size"):
        S3Config(type="s3", bucket="abc", multipart_part_size="1MiB")
    with pytest.raises(ValidationError, match="partition keys must be unique"):
        S3Config(type="s3", bucket="abc", partition_by=["date", "date"])
    with pytest.raises(ValidationError, match="key_prefix"):
        S3Config(type="s3", bucket="abc", key_prefix="a/../b")
    assert S3Config(type="s3", bucket="abc", key_prefix="/x/y/").key_prefix == "x/y"


# -- one bad partition costs itself; keys fit whatever the ids (issues 12, 13) ----------------

FLEET_BATCH = "edge-" + "x" * 29 + "_0123456789-1a2b3c4d-000000000017-000000000058-0003"
CJK = "温度传感器" * 6


def poisoned(n_good: int = 41) -> pl.DataFrame:
    """``n_good`` plain readings plus the odd ones: a 30-CJK metric, a 1 MB metric, NaN, inf,
    an empty metric; record ids of the runtime's fleet shape."""
    good = readings(n_good, FLEET_BATCH).to_dicts()
    odd = []
    for i, (metric, value) in enumerate(
        [(CJK, 1.0), ("x" * 1_000_000, 2.0), ("nan", float("nan")), ("inf", float("inf")),
         ("", 3.0)]
    ):
        row = dict(good[0])
        row.update(metric=metric, value=value, record_id=f"{FLEET_BATCH}:{n_good + i}")
        odd.append(row)
    return pl.DataFrame(good + odd, schema=SCHEMA)


async def test_odd_values_land_under_bounded_keys(moto_url: str, bucket: str, ctx: Context):
    table = poisoned()
    long_device = "d" * 500
    table = table.with_columns(pl.lit(long_device, pl.String).alias("device"))
    prefix = "/".join(["p" * 50] * 5)[:256]
    sink = sink_for(moto_url, bucket, ctx, key_prefix=prefix,
                    partition_by=["device", "source", "metric", "date", "hour"])
    await sink.open()
    await sink.write(table, FLEET_BATCH)
    await sink.close()
    blobs = objects(moto_url, bucket)
    assert all(len(k.encode()) <= 1024 for k in blobs)
    assert all(k.endswith(f"/part-{FLEET_BATCH}.parquet") for k in blobs)
    rows = rows_of(blobs)
    assert sorted(r["record_id"] for r in rows) == sorted(table.get_column("record_id").to_list())
    assert {r["metric"] for r in rows} >= {CJK, "x" * 1_000_000, ""}  # full values in the file
    assert {r["device"] for r in rows} == {long_device}


async def test_an_object_refused_for_good_costs_only_its_rows(
    moto_url: str, bucket: str, ctx: Context
):
    """S3 refuses the CJK partition's object (400): only those rows are rejected, on the first
    try; every other partition's object is in the bucket."""
    table = poisoned()
    sink = sink_for(moto_url, bucket, ctx)
    await sink.open()

    def refuse_cjk(request: Any, **_: Any) -> Any:
        if "%25E6%25B8%25A9" in request.url or "%E6%B8%A9" in request.url:
            return fake_response(request, 400, b"<Error><Code>InvalidArgument</Code>"
                                 b"<Message>no</Message></Error>")
        return None

    sink.client.meta.events.register("before-send.s3.PutObject", refuse_cjk)
    with pytest.raises(PartialWriteError) as caught:
        await sink.write(table, FLEET_BATCH)
    await sink.close()
    err = caught.value
    assert err.retry_rows is None and err.rejected_rows is not None
    assert err.rejected_rows.get_column("metric").to_list() == [CJK]
    assert err.reasons and "InvalidArgument" in err.reasons[0]
    landed = {r["record_id"] for r in rows_of(objects(moto_url, bucket))}
    rejected = set(err.rejected_rows.get_column("record_id").to_list())
    assert landed | rejected == set(table.get_column("record_id").to_list())
    assert not landed & rejected


def test_key_prefix_is_bounded():
    with pytest.raises(ValidationError, match="key_prefix"):
        S3Config(type="s3", bucket="abc", key_prefix="k" * 300)
