"""The firehose sink against a real moto server: a delivery stream to S3, faults, packing."""

from __future__ import annotations

import base64
import json
import uuid
from collections import Counter
from typing import Any

import polars as pl
import pytest
from pydantic import ValidationError

from collector.errors import PartialWriteError, TransientSinkError
from collector.plugin import Context
from sinks.firehose import (
    MAX_RECORD_BYTES,
    FirehoseConfig,
    FirehoseSink,
    calls,
    ndjson_lines,
    pack,
)

from .conftest import Outage, admin, as_json_rows, deliver, from_ndjson, readings


@pytest.fixture
def stream(moto_url: str, bucket: str) -> tuple[str, str]:
    """A DirectPut delivery stream whose S3 destination is ``bucket`` under ``raw/``."""
    name = f"sensors-{uuid.uuid4().hex[:8]}"
    admin("firehose", moto_url).create_delivery_stream(
        DeliveryStreamName=name,
        DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "RoleARN": "arn:aws:iam::123456789012:role/firehose",
            "BucketARN": f"arn:aws:s3:::{bucket}",
            "Prefix": "raw/",
        },
    )
    return name, bucket


def landed(url: str, bucket: str) -> list[dict[str, Any]]:
    """Every NDJSON row Firehose delivered to the bucket."""
    s3 = admin("s3", url)
    blobs = [
        s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in s3.list_objects_v2(Bucket=bucket, Prefix="raw/").get("Contents", [])
    ]
    return from_ndjson(blobs)


def canon(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def sink_for(url: str, stream: str, ctx: Context, **kw: Any) -> FirehoseSink:
    return FirehoseSink(
        FirehoseConfig(type="firehose", stream=stream, endpoint_url=url, region="us-east-1",
                       **kw),
        ctx,
    )


async def test_records_land_in_bucket_exactly_as_sent(moto_url: str, stream, ctx: Context):
    name, bucket = stream
    table = readings(2_000)
    sink = sink_for(moto_url, name, ctx, record_target_bytes=4_900, max_records_per_call=20)
    await sink.open()
    sizes: list[list[int]] = []

    def spy(request: Any, **_: Any) -> None:
        body = json.loads(request.body)
        sizes.append([len(base64.b64decode(r["Data"])) for r in body["Records"]])

    sink.client.meta.events.register("before-send.firehose.PutRecordBatch", spy)
    await sink.write(table, "000000000000-000000001999")
    await sink.close()
    assert canon(landed(moto_url, bucket)) == canon(as_json_rows(table))
    # packing and call limits held on the wire
    assert all(len(c) <= 20 for c in sizes) and len(sizes) > 1
    assert all(s <= 4_900 for c in sizes for s in c)
    assert sum(len(c) for c in sizes) < table.height / 20  # many readings per record


class FaultyFirehose:
    """``before-send`` hook: delivers some records for real (via a plain client), fails others.

    ``script`` is consumed one entry per HTTP attempt: ``"ok"`` passes through, ``"partial"``
    forwards every other record and reports the rest as failed, ``"throttle"`` answers
    ServiceUnavailableException (HTTP 400, like Firehose), ``"500"`` an InternalFailure,
    ``"lost_ack"`` delivers everything but answers 500 (a timeout after landing).
    """

    def __init__(
        self, url: str, stream: str, script: list[str], poison: bytes | None = None
    ) -> None:
        self.client = admin("firehose", url)
        self.stream = stream
        self.script = list(script)
        self.seen: list[str] = []
        self.poison = poison
        """A call holding a record that contains these bytes is refused as a whole (400)."""

    def __call__(self, request: Any, **_: Any) -> Any:
        from .test_s3 import fake_response

        step = self.script.pop(0) if self.script else "ok"
        body = json.loads(request.body)
        records = [{"Data": base64.b64decode(r["Data"])} for r in body["Records"]]
        if self.poison is not None and any(self.poison in r["Data"] for r in records):
            step = "invalid"
        self.seen.append(step)
        if step == "ok":
            return None
        if step == "throttle":
            return fake_response(request, 400, json.dumps(
                {"__type": "ServiceUnavailableException", "message": "Slow down."}).encode(),
                {"content-type": "application/x-amz-json-1.1"})
        if step == "500":
            return fake_response(request, 500, json.dumps(
                {"__type": "InternalFailure", "message": "boom"}).encode(),
                {"content-type": "application/x-amz-json-1.1"})
        if step == "invalid":
            return fake_response(request, 400, json.dumps(
                {"__type": "InvalidArgumentException", "message": "bad record"}).encode(),
                {"content-type": "application/x-amz-json-1.1"})
        if step == "lost_ack":
            self.client.put_record_batch(DeliveryStreamName=self.stream, Records=records)
            return fake_response(request, 500, b'{"__type": "InternalFailure"}',
                                 {"content-type": "application/x-amz-json-1.1"})
        assert step == "partial"
        good = records[::2]
        if good:
            self.client.put_record_batch(DeliveryStreamName=self.stream, Records=good)
        answers = [
            {"RecordId": f"r{i}"} if i % 2 == 0
            else {"ErrorCode": "ServiceUnavailableException", "ErrorMessage": "Slow down."}
            for i in range(len(records))
        ]
        payload = {"FailedPutCount": len(records) // 2, "Encrypted": False,
                   "RequestResponses": answers}
        return fake_response(request, 200, json.dumps(payload).encode(),
                             {"content-type": "application/x-amz-json-1.1"})


async def test_partial_failures_retry_only_failed_records(moto_url: str, stream, ctx: Context):
    name, bucket = stream
    table = readings(600)
    sink = sink_for(moto_url, name, ctx, record_target_bytes=2_000, max_records_per_call=10,
                    max_attempts=1)
    await sink.open()
    hook = FaultyFirehose(moto_url, name, ["partial", "ok", "partial", "partial", "throttle"])
    sink.client.meta.events.register("before-send.firehose.PutRecordBatch", hook)
    with pytest.raises(PartialWriteError) as info:
        await sink.write(table, "b")
    assert info.value.rejected_rows is None
    retry = info.value.retry_rows
    assert retry is not None and 0 < retry.height < table.height
    # exactly the rows of the failed records come back: none of them landed yet
    landed_ids = {r["record_id"] for r in landed(moto_url, bucket)}
    retry_ids = set(retry.get_column("record_id").to_list())
    assert landed_ids.isdisjoint(retry_ids)
    assert landed_ids | retry_ids == set(table.get_column("record_id").to_list())

    await deliver(sink, retry, "b")
    await sink.close()
    rows = landed(moto_url, bucket)
    ids = Counter(r["record_id"] for r in rows)
    assert max(ids.values()) == 1  # no duplicate from our side
    assert canon(rows) == canon(as_json_rows(table))
    assert "partial" in hook.seen and "throttle" in hook.seen


async def test_throttling_500s_and_lost_acks_at_least_once(moto_url: str, stream, ctx: Context):
    name, bucket = stream
    table = readings(300)
    sink = sink_for(moto_url, name, ctx, record_target_bytes=1_500, max_records_per_call=5,
                    max_attempts=2)
    await sink.open()
    script = ["throttle", "500", "500", "ok", "lost_ack", "lost_ack", "partial", "500",
              "throttle", "ok", "partial", "500", "500", "ok"]
    hook = FaultyFirehose(moto_url, name, script)
    sink.client.meta.events.register("before-send.firehose.PutRecordBatch", hook)
    seen = await deliver(sink, table, "b", attempts=60)
    await sink.close()
    assert any(s.startswith("transient") for s in seen)
    assert any(s.startswith("partial") for s in seen)
    rows = landed(moto_url, bucket)
    ids = Counter(r["record_id"] for r in rows)
    assert set(ids) == set(table.get_column("record_id").to_list())
    assert max(ids.values()) >= 2  # a lost ack re-sent rows: duplicates are visible...
    dedup = {r["record_id"]: r for r in rows}  # ...and removable by record_id
    assert canon(list(dedup.values())) == canon(as_json_rows(table))


async def test_permanent_error_mid_batch_dead_letters_only_that_record(
    moto_url: str, stream, ctx: Context
):
    """A call refused for good because of one record: the call is halved until that record
    stands alone; only its rows go to the dead letter, the other records of the call land."""
    name, bucket = stream
    table = readings(90, "b")
    sink = sink_for(moto_url, name, ctx, record_target_bytes=1_000, max_records_per_call=5)
    await sink.open()
    hook = FaultyFirehose(moto_url, name, [], poison=b'"record_id":"b:37"')
    sink.client.meta.events.register("before-send.firehose.PutRecordBatch", hook)
    with pytest.raises(PartialWriteError) as info:
        await sink.write(table, "b")
    await sink.close()
    err = info.value
    assert err.retry_rows is None and err.rejected_rows is not None
    rejected = set(err.rejected_rows.get_column("record_id").to_list())
    assert "b:37" in rejected
    assert len(rejected) < 10  # one packed record's rows (~1,000 bytes), not the call's 5
    assert len(err.reasons) == err.rejected_rows.height
    assert all("InvalidArgumentException" in r for r in err.reasons)
    landed_rows = landed(moto_url, bucket)
    assert {r["record_id"] for r in landed_rows} | rejected == set(
        table.get_column("record_id").to_list())
    assert canon(landed_rows) == canon(
        [r for r in as_json_rows(table) if r["record_id"] not in rejected])


async def test_endpoint_down_for_a_while(moto_url: str, stream, ctx: Context):
    name, bucket = stream
    outage = Outage(moto_url)
    table = readings(120)
    sink = sink_for(outage.url, name, ctx, max_attempts=1, connect_timeout=1)
    await sink.open()
    with pytest.raises(TransientSinkError):
        await sink.write(table, "b")
    assert landed(moto_url, bucket) == []

    await outage.up()
    await deliver(sink, table, "b")
    await sink.close()
    await outage.down()
    assert canon(landed(moto_url, bucket)) == canon(as_json_rows(table))


async def test_missing_stream_is_transient(moto_url: str, aws_env: None, ctx: Context):
    sink = sink_for(moto_url, "does-not-exist", ctx)
    await sink.open()
    with pytest.raises(TransientSinkError, match="ResourceNotFound"):
        await sink.write(readings(3), "b")
    await sink.close()


async def test_oversized_line_is_rejected_rest_delivered(moto_url: str, stream, ctx: Context):
    name, bucket = stream
    table = readings(10)
    units = table.get_column("unit").to_list()
    units[3] = "x" * (MAX_RECORD_BYTES + 10)
    table = table.with_columns(pl.Series("unit", units, pl.String))
    sink = sink_for(moto_url, name, ctx)
    await sink.open()
    with pytest.raises(PartialWriteError) as info:
        await sink.write(table, "b")
    await sink.close()
    err = info.value
    assert err.retry_rows is None
    assert err.rejected_rows is not None
    assert err.rejected_rows.get_column("record_id").to_list() == ["000000000000-000000000099:3"]
    assert len(err.reasons) == 1
    expected = [r for i, r in enumerate(as_json_rows(table)) if i != 3]
    assert canon(landed(moto_url, bucket)) == canon(expected)


def test_pack_and_calls_respect_limits():
    lines = [b"x" * n + b"\n" for n in (10, 300, 4_600, 20, 6_000, 30, 40)]
    records = pack(lines, 4_900)
    assert [r.rows for r in records] == [[0, 1], [2, 3], [4], [5, 6]]
    assert all(len(r.data) <= 4_900 for r in records if len(r.rows) > 1)
    assert b"".join(r.data for r in records) == b"".join(lines)
    groups = calls(records, max_records=2, max_bytes=10_000)
    assert [[r.rows for r in g] for g in groups] == [[[0, 1], [2, 3]], [[4], [5, 6]]]
    groups = calls(records, max_records=500, max_bytes=5_000)
    assert all(sum(len(r.data) for r in g) <= 5_000 or len(g) == 1 for g in groups)


def test_ndjson_lines_round_trip():
    table = readings(40)
    lines = ndjson_lines(table)
    assert len(lines) == 40 and all(line.endswith(b"\n") for line in lines)
    assert [json.loads(line) for line in lines] == as_json_rows(table)
    assert json.loads(lines[0])["ts"] == "2024-01-01T23:00:00Z"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_records_per_call", 501, "at most 500 records"),
        ("max_request_bytes", "5MiB", "at most 4MiB"),
        ("record_target_bytes", 1_024_001, "at most 1,000 KiB"),
    ],
)
def test_config_rejects_settings_above_service_limits(field: str, value: Any, message: str):
    with pytest.raises(ValidationError, match=message):
        FirehoseConfig(type="firehose", stream="s", **{field: value})
    FirehoseConfig(type="firehose", stream="s", max_records_per_call=500,
                   max_request_bytes="4MiB", record_target_bytes=1_024_000)


async def test_gzip_records_land_as_a_valid_gzip_stream(moto_url: str, stream, ctx: Context):
    import gzip

    name, bucket = stream
    table = readings(3_000)
    sink = sink_for(moto_url, name, ctx, compression="gzip", record_target_bytes=4_900)
    await sink.open()
    sizes: list[int] = []
    sink.client.meta.events.register(
        "before-send.firehose.PutRecordBatch",
        lambda request, **_: sizes.extend(
            len(base64.b64decode(r["Data"])) for r in json.loads(request.body)["Records"]
        ),
    )
    await sink.write(table, "b")
    await sink.close()
    assert sizes and all(s <= 4_900 for s in sizes)
    assert sum(sizes) < sum(len(x) for x in ndjson_lines(table)) / 4  # really compressed
    s3 = admin("s3", moto_url)
    blobs = [s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
             for o in s3.list_objects_v2(Bucket=bucket, Prefix="raw/")["Contents"]]
    rows = from_ndjson([gzip.decompress(b) for b in blobs])  # multi-member gzip per object
    assert canon(rows) == canon(as_json_rows(table))
