"""Packing and acknowledgement of the mqtt sink, against a real mosquitto with mutual TLS."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from collector.errors import PartialWriteError, TransientSinkError
from collector.plugin import Context
from collector.schema import POLARS_SCHEMA, RECORD_ID
from sinks.firehose import ndjson_lines
from sinks.mqtt import MqttSink, MqttSinkConfig, plan
from tests.sources.peers import Mosquitto, wait_for

from .broker import Certs, Subscriber, make_certs, tls_broker

SCHEMA: dict[str, pl.DataType] = {**POLARS_SCHEMA, RECORD_ID: pl.String()}
ACL = "user reader\ntopic read #\nuser edge-01\ntopic write dt/+/+/temperature\n"


def readings(n: int, metric: str | list[str] = "temperature", unit: list[str] | None = None
             ) -> pl.DataFrame:
    """``n`` readings whose NDJSON lines all have the same length (unless ``unit`` varies)."""
    ts = datetime(2024, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    metrics = [metric] * n if isinstance(metric, str) else metric
    return pl.DataFrame(
        {
            "ts": [ts] * n,
            "device": ["edge-01"] * n,
            "source": ["room"] * n,
            "metric": metrics,
            "value": [21.5] * n,
            "unit": unit or ["C"] * n,
            RECORD_ID: [f"edge-01-0badf00d-000000000001-000000000009:{i:05d}" for i in range(n)],
        },
        schema=SCHEMA,
    )


@pytest.mark.parametrize("fmt", ["ndjson", "json"])
def test_n_readings_become_ceil_bytes_over_target_messages(fmt: str) -> None:
    table = readings(500)
    lines = ndjson_lines(table)
    size = len(lines[0])
    assert {len(x) for x in lines} == {size}
    extra = 1 if fmt == "json" else 0
    for per_message in (1, 7, 64, 500):
        target = per_message * size + extra
        cfg = MqttSinkConfig(type="mqtt", format=fmt, payload_target_bytes=target,
                             max_payload_bytes=max(target, 4096))
        p = plan(table, cfg)
        total = sum(map(len, lines))
        assert len(p.messages) == math.ceil(total / (target - extra))
        assert all(len(m.payload) <= target for m in p.messages)
        assert [r for m in p.messages for r in m.rows] == list(range(500))
        assert not p.rejected
        for m in p.messages:
            docs = (json.loads(m.payload) if fmt == "json"
                    else [json.loads(x) for x in m.payload.splitlines()])
            assert [d[RECORD_ID] for d in docs] == [table.get_column(RECORD_ID)[r] for r in m.rows]
            assert m.topic == "dt/edge-01/room/temperature"


def test_default_target_stays_under_128k_and_a_5kb_multiple() -> None:
    cfg = MqttSinkConfig(type="mqtt")
    p = plan(readings(5_000), cfg)
    assert all(len(m.payload) <= cfg.payload_target_bytes <= 128 * 1024 for m in p.messages)
    assert all(math.ceil(len(m.payload) / 5_000) <= 25 for m in p.messages)
    assert all(math.ceil(len(m.payload) / 5_120) <= 25 for m in p.messages)


@pytest.fixture
def pki(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "pki")


@pytest.fixture
def broker(tmp_path: Path, pki: Certs) -> Iterator[Mosquitto]:
    b = tls_broker(tmp_path, pki, acl=ACL)
    b.start()
    yield b
    b.stop()


def sink(tmp_path: Path, broker: Mosquitto, pki: Certs, **extra: object) -> MqttSink:
    cert, key = pki.client("edge-01")
    cfg = MqttSinkConfig.model_validate({
        "type": "mqtt", "host": "127.0.0.1", "port": broker.port,
        "tls": {"ca_certs": str(pki.ca), "certfile": str(cert), "keyfile": str(key)},
        "ack_timeout": "10s", **extra,
    })
    return MqttSink(cfg, Context(device="edge-01", component="iot", data_dir=tmp_path))


async def test_oversized_reading_and_refused_messages_go_to_the_dead_letter(
    tmp_path: Path, broker: Mosquitto, pki: Certs
) -> None:
    sub = Subscriber(broker.port, pki)
    n = 60
    metrics = ["pressure" if i % 10 == 3 else "temperature" for i in range(n)]
    units = ["x" * 5_000 if i == 17 else "C" for i in range(n)]
    table = readings(n, metrics, units)
    s = sink(tmp_path, broker, pki, payload_target_bytes=1_000, max_payload_bytes=4_096)
    await s.open()
    try:
        with pytest.raises(PartialWriteError) as err:
            await s.write(table, "b")
    finally:
        await s.close()
    exc = err.value
    assert exc.retry_rows is None
    rejected = exc.rejected_rows.get_column(RECORD_ID).to_list()
    denied = {table.get_column(RECORD_ID)[i] for i in range(n) if metrics[i] == "pressure"}
    big = table.get_column(RECORD_ID)[17]
    assert set(rejected) == denied | {big} and len(rejected) == len(denied) + 1
    reasons = dict(zip(rejected, exc.reasons, strict=True))
    assert "over max_payload_bytes" in reasons[big]
    assert all("Not authorized (0x87)" in reasons[r] for r in denied)

    expected = {table.get_column(RECORD_ID)[i] for i in range(n)} - denied - {big}
    wait_for(lambda: {r[RECORD_ID] for r in sub.rows()} >= expected, 15, "the accepted readings")
    sub.stop()
    got = [r[RECORD_ID] for r in sub.rows()]
    assert sorted(got) == sorted(expected)  # each once: nothing refused was sent again
    assert all(len(p) <= 1_000 for _, p, _ in sub.messages)
    assert {props["content_type"] for *_, props in sub.messages} == {"application/x-ndjson"}
    assert {t for t, *_ in sub.messages} == {"dt/edge-01/room/temperature"}


async def test_broker_down_keeps_the_batch_then_delivers(
    tmp_path: Path, broker: Mosquitto, pki: Certs
) -> None:
    sub = Subscriber(broker.port, pki)
    table = readings(30)
    s = sink(tmp_path, broker, pki, payload_target_bytes=2_000, format="json")
    await s.open()
    broker.stop()
    try:
        with pytest.raises(TransientSinkError):
            await s.write(table, "b")
        broker.start()
        await s.write(table, "b")  # the same batch again, as the spool retries it
    finally:
        await s.close()
    ids = set(table.get_column(RECORD_ID).to_list())
    wait_for(lambda: {r[RECORD_ID] for r in sub.rows()} >= ids, 15, "the batch")
    sub.stop()
    assert all(json.loads(p) for _, p, _ in sub.messages)  # JSON arrays
    assert s.ctx.counters.get("mqtt_rows_sent_total", component="iot") == 30
