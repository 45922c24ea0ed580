"""How much the collector saves in cloud bills, against the talk's one-publish-per-reading design.

Two scenarios: the talk's demo (one temperature every 5 s for 24 h, 17,280 readings) and a
fleet (100 sensors at 1 Hz for 1 h, 360,000 readings). Values come from the `simulated` source's
pure ``generate``.

Our side runs the runtime's own deterministic code: every tick becomes a log entry fed to
:class:`collector.runtime.pipeline.Pipeline` (the real filter and window transforms and the real
batcher, cutting on the entry's wall clock = event time, as it would live), and every batch it
cuts goes through the sinks' own encoders: ``sinks.firehose.ndjson_lines`` + ``pack`` /
``pack_gzip`` + ``calls`` for Firehose, ``sinks._partition.split`` + ``sinks.s3.to_parquet`` for
the S3 lake. Nothing is estimated on our side except the HTTP envelope (see below).

The per-reading side is the talk's design: one JSON message per reading (the same fields as our
lines, without ``record_id``), published over MQTT to IoT Core, whose rule calls Firehose
``PutRecord`` once per message. Firehose bills each record rounded up to 5 KiB
(``collector.commands.economics.billable``).

Figures per scenario and design: payload bytes leaving the device, wire bytes (HTTP requests as
botocore serialises them, or MQTT PUBLISH packets; TLS excluded), API calls, Firehose records
and billable bytes, and S3 PUTs. ``collector.commands.economics.firehose_costs`` is printed beside
the measured packing as a cross-check of the cost model.

    python -m benchmarks.economics
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks._common import fmt_bytes, table, write_json
from collector.commands.economics import billable, firehose_costs
from collector.plugin import BatchConfig, Context, Transform
from collector.runtime.log import Entry, Kind
from collector.runtime.pipeline import Pipeline, Route
from collector.schema import normalize
from collector.sources.simulated import SimulatedConfig, generate
from collector.transforms.filter import FilterConfig, FilterTransform
from collector.transforms.window import WindowConfig, WindowTransform
from sinks._partition import split
from sinks.firehose import (
    DEFAULT_BATCH_AGE,
    DEFAULT_RECORD_TARGET,
    MAX_RECORDS_PER_CALL,
    MAX_REQUEST_BYTES,
    calls,
    ndjson_lines,
    pack,
    pack_gzip,
)
from sinks.mqtt import DEFAULT_BATCH_AGE as MQTT_BATCH_AGE
from sinks.mqtt import MqttSinkConfig, metered_units, plan
from sinks.s3 import to_parquet

START = datetime(2024, 1, 1, tzinfo=UTC)
DELIVERY_BUFFER_S = 300.0
"""Firehose's default S3 buffering interval: both designs land one S3 object per interval."""
DELIVERY_BUFFER_BYTES = 5 * 1024**2
MQTT_TOPIC = "sensors/edge-01/temperature"
TARGETS = {"billable": 50, "calls": 100, "bytes": 10}
LONG_BATCH_AGE = 900.0
"""`batch.max_age: 15m`, Firehose's longest buffering interval: what a slow sensor needs to
clear 100x fewer calls (the default 5m cuts a batch of only 5-6 one-minute aggregates)."""


@dataclass
class Scenario:
    name: str
    devices: int
    every_s: float
    seconds: int

    @property
    def readings(self) -> int:
        return self.devices * int(self.seconds / self.every_s)


SCENARIOS = [
    Scenario("talk demo: 1 sensor every 5 s, 24 h", 1, 5.0, 86_400),
    Scenario("fleet: 100 sensors at 1 Hz, 1 h", 100, 1.0, 3_600),
]


@dataclass
class Tally:
    """What one design sends over one scenario."""

    payload_bytes: int = 0
    wire_bytes: int = 0
    calls: int = 0
    records: int = 0
    billable_bytes: int = 0
    s3_puts: int = 0
    rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


# -- wire sizes ------------------------------------------------------------------------------


def _botocore_request_sizes() -> dict[str, tuple[int, int]]:
    """(fixed bytes, bytes per base64 char) of PutRecord / PutRecordBatch / PutObject requests.

    Measured by letting botocore serialise and sign real requests and stopping them at
    ``before-send`` (nothing leaves the machine): request line + headers + body.
    """
    import botocore.session
    from botocore.awsrequest import AWSResponse

    sizes: list[int] = []

    def capture(request: Any, **_: Any) -> AWSResponse:
        body = request.body or b""
        if hasattr(body, "read"):
            body = body.read()
        head = (
            f"{request.method} {request.url} HTTP/1.1\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
            + "\r\n"
        )
        sizes.append(len(head.encode()) + len(body))

        reply = b"{}" if "firehose" in request.url else b""

        class Raw:
            def stream(self, **_: Any) -> Any:
                yield reply

        return AWSResponse(request.url, 200, {}, Raw())

    session = botocore.session.get_session()
    out: dict[str, tuple[int, int]] = {}
    from botocore.config import Config

    kw = {
        "region_name": "eu-west-1",
        "aws_access_key_id": "AKIDEXAMPLE",
        "aws_secret_access_key": "secret",
        "config": Config(retries={"total_max_attempts": 1}),
    }
    fh = session.create_client("firehose", **kw)
    fh.meta.events.register("before-send.firehose.*", capture)
    for data in (b"x" * 300, b"x" * 600):
        fh.put_record(DeliveryStreamName="sensor-stream", Record={"Data": data})
    one, two = sizes[-2:]
    out["PutRecord"] = (one - _b64(300), (two - one) // (_b64(600) - _b64(300)))
    sizes.clear()
    for n in (1, 2):
        fh.put_record_batch(DeliveryStreamName="sensor-stream", Records=[{"Data": b"x" * 300}] * n)
    one, two = sizes[-2:]
    per_record = two - one
    out["PutRecordBatch"] = (one - per_record, per_record - _b64(300))
    sizes.clear()
    s3 = session.create_client("s3", **kw)
    s3.meta.events.register("before-send.s3.*", capture)
    s3.put_object(
        Bucket="sensor-lake",
        Key="lake/metric=temperature/date=2024-01-01/part-000000000000-000000000059.parquet",
        Body=b"x" * 1000,
    )
    out["PutObject"] = (sizes[-1] - 1000, 0)
    return out


def _b64(n: int) -> int:
    return 4 * math.ceil(n / 3)


def mqtt_publish_bytes(topic: str, payload: int, qos: int = 1) -> int:
    """Size of an MQTT 3.1.1 PUBLISH packet: fixed header, topic, packet id, payload."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload
    varint = 1 if remaining < 128 else 2 if remaining < 16_384 else 3
    return 1 + varint + remaining


# -- the two designs -------------------------------------------------------------------------


def ticks(sc: Scenario) -> list[pl.DataFrame]:
    """One canonical frame per tick, as the runtime would log it."""
    cfg = SimulatedConfig(
        every=sc.every_s,
        seed=7,
        start=START,
        devices=sc.devices,
        metrics={"temperature": {"kind": "uniform", "min": 0, "max": 30, "unit": "C"}},
    )
    out = []
    for t in range(int(sc.seconds / sc.every_s)):
        rows = generate(cfg, "edge-01", t, START)
        df = normalize(rows, device="edge-01", source="room", now=START)
        out.append(df)
    return out


def pipeline_batches(
    tables: list[pl.DataFrame], sc: Scenario, windowed: bool, max_age: float
) -> list[pl.DataFrame]:
    """Batches the real pipeline cuts for one sink, entries timed at their event time."""
    ctx = Context(device="edge-01", component="bench", data_dir=Path("/nonexistent"))
    transforms: list[Transform] = []
    if windowed:
        transforms = [
            FilterTransform(FilterConfig(type="filter", where="value BETWEEN -40 AND 85"), ctx),
            WindowTransform(
                WindowConfig(type="window", every=60, aggs=["mean", "min", "max", "count"]), ctx
            ),
        ]
    route = Route(
        "sink", None, BatchConfig(max_rows=100_000, max_bytes=64 * 1024**2, max_age=max_age)
    )
    pipe = Pipeline(transforms, [route])
    out: list[pl.DataFrame] = []
    start_us = int(START.timestamp() * 1e6)
    offset = 0
    for i, t in enumerate(tables):
        wall = start_us + int(i * sc.every_s * 1e6)
        out += [b.frame for b in pipe.process(Entry(offset, Kind.DATA, wall, t))]
        offset += 1
    end = start_us + int(sc.seconds * 1e6)
    out += [b.frame for b in pipe.process(Entry(offset, Kind.FLUSH, end, None))]
    return out


def firehose_tally(
    batches: list[pl.DataFrame], wire: dict[str, tuple[int, int]], gzip: bool
) -> Tally:
    t = Tally()
    fixed, per_record = wire["PutRecordBatch"]
    for b in batches:
        lines = ndjson_lines(b)
        records = (pack_gzip if gzip else pack)(lines, DEFAULT_RECORD_TARGET)
        groups = calls(records, MAX_RECORDS_PER_CALL, MAX_REQUEST_BYTES)
        t.rows += b.height
        t.records += len(records)
        t.calls += len(groups)
        t.payload_bytes += sum(len(r.data) for r in records)
        t.billable_bytes += sum(billable(len(r.data)) for r in records)
        t.wire_bytes += fixed * len(groups) + sum(per_record + _b64(len(r.data)) for r in records)
    return t


def s3_tally(batches: list[pl.DataFrame], wire: dict[str, tuple[int, int]]) -> Tally:
    t = Tally()
    fixed = wire["PutObject"][0]
    for b in batches:
        t.rows += b.height
        for _, rows in split(b, ["metric", "date"]):
            body = to_parquet(rows)
            t.s3_puts += 1
            t.calls += 1
            t.payload_bytes += len(body)
            t.wire_bytes += fixed + len(body)
    return t


def delivery_objects(sc: Scenario, payload_bytes: int) -> int:
    """S3 objects Firehose writes: one per buffer interval, more if 5 MiB fills first."""
    by_time = math.ceil(sc.seconds / DELIVERY_BUFFER_S)
    by_size = math.ceil(payload_bytes / DELIVERY_BUFFER_BYTES)
    return max(by_time, by_size)


def per_reading_tally(
    tables: list[pl.DataFrame], sc: Scenario, wire: dict[str, tuple[int, int]]
) -> Tally:
    """One JSON message per reading: MQTT publish to IoT Core, the rule's PutRecord each."""
    t = Tally()
    fixed, _ = wire["PutRecord"]
    for tb in tables:
        for line in ndjson_lines(tb):
            n = len(line) - 1  # one message per reading: no newline needed
            t.rows += 1
            t.payload_bytes += n
            t.wire_bytes += mqtt_publish_bytes(MQTT_TOPIC, n)
            t.records += 1
            t.billable_bytes += billable(n)
            t.extra["iot_metered_units"] = t.extra.get("iot_metered_units", 0) + metered_units(n)
            t.extra["firehose_put_record_bytes"] = (
                t.extra.get("firehose_put_record_bytes", 0) + fixed + _b64(n)
            )
    t.calls = t.rows  # the device's IoT Core publishes; the rule adds one PutRecord each
    t.extra["iot_rule_put_record_calls"] = t.rows
    t.s3_puts = delivery_objects(sc, t.payload_bytes)
    return t


def mqtt_tally(batches: list[pl.DataFrame]) -> Tally:
    """The `mqtt` sink's own planner with its defaults: NDJSON per topic
    ``dt/{device}/{source}/{metric}``, messages up to 124,900 bytes; IoT Core metered units."""
    cfg = MqttSinkConfig(type="mqtt", host="example-ats.iot.eu-west-1.amazonaws.com")
    t = Tally()
    units = 0
    for b in batches:
        t.rows += b.height
        for m in plan(b, cfg).messages:
            t.calls += 1
            t.records += 1
            t.payload_bytes += len(m.payload)
            t.wire_bytes += mqtt_publish_bytes(m.topic, len(m.payload))
            units += metered_units(len(m.payload))
    t.extra["iot_metered_units"] = units
    return t


def run_scenario(sc: Scenario, wire: dict[str, tuple[int, int]]) -> dict[str, Any]:
    tables = ticks(sc)
    assert sum(t.height for t in tables) == sc.readings
    base = per_reading_tally(tables, sc, wire)
    designs: dict[str, Tally] = {}
    raw = pipeline_batches(tables, sc, windowed=False, max_age=DEFAULT_BATCH_AGE)
    agg = pipeline_batches(tables, sc, windowed=True, max_age=DEFAULT_BATCH_AGE)
    designs["firehose, raw readings packed"] = firehose_tally(raw, wire, gzip=False)
    designs["firehose, raw packed + gzip"] = firehose_tally(raw, wire, gzip=True)
    designs["firehose, 1-min aggregates packed"] = firehose_tally(agg, wire, gzip=False)
    designs["firehose, 1-min aggregates + gzip"] = firehose_tally(agg, wire, gzip=True)
    slow = pipeline_batches(tables, sc, windowed=True, max_age=LONG_BATCH_AGE)
    designs["firehose, 1-min aggregates + gzip, 15-min batches"] = firehose_tally(
        slow, wire, gzip=True
    )
    designs["s3 lake, 1-min aggregates (Parquet)"] = s3_tally(agg, wire)
    mqtt_raw = pipeline_batches(tables, sc, windowed=False, max_age=MQTT_BATCH_AGE)
    mqtt_agg = pipeline_batches(tables, sc, windowed=True, max_age=MQTT_BATCH_AGE)
    designs["mqtt to IoT Core, raw readings packed"] = mqtt_tally(mqtt_raw)
    designs["mqtt to IoT Core, 1-min aggregates packed"] = mqtt_tally(mqtt_agg)
    designs["s3 lake, raw readings (Parquet)"] = s3_tally(raw, wire)
    for name, d in designs.items():
        if name.startswith("firehose"):
            d.s3_puts = delivery_objects(sc, d.payload_bytes)
    bytes_per_line = sum(len(x) for b in raw for x in ndjson_lines(b)) / sc.readings
    model = firehose_costs(
        sc.readings, bytes_per_line, readings_per_batch=DEFAULT_BATCH_AGE / sc.every_s * sc.devices
    )
    out: dict[str, Any] = {
        "readings": sc.readings,
        "devices": sc.devices,
        "every_s": sc.every_s,
        "seconds": sc.seconds,
        "batch_max_age_s": DEFAULT_BATCH_AGE,
        "long_batch_max_age_s": LONG_BATCH_AGE,
        "per_reading": base.as_dict(),
        "designs": {},
        "model_cross_check": {
            "bytes_per_line": round(bytes_per_line, 1),
            "model_packed": model["packed"],
            "measured_packed": designs["firehose, raw readings packed"].as_dict(),
        },
    }
    for name, d in designs.items():
        out["designs"][name] = {
            **d.as_dict(),
            "fewer_bytes_x": _ratio(base.payload_bytes, d.payload_bytes),
            "fewer_wire_bytes_x": _ratio(base.wire_bytes, d.wire_bytes),
            "fewer_calls_x": _ratio(base.calls, d.calls),
            "fewer_aws_calls_x": _ratio(base.calls * 2, d.calls),
            "fewer_billable_x": _ratio(base.billable_bytes, d.billable_bytes)
            if d.billable_bytes
            else None,
            "fewer_metered_x": _ratio(
                base.extra.get("iot_metered_units", 0), d.extra["iot_metered_units"]
            )
            if "iot_metered_units" in d.extra
            else None,
        }
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 1) if b else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    wire = _botocore_request_sizes()
    result: dict[str, Any] = {
        "targets_x": TARGETS,
        "wire_model": {k: {"fixed_bytes": v[0], "per_record_bytes": v[1]} for k, v in wire.items()},
        "scenarios": {},
    }
    for sc in SCENARIOS:
        r = run_scenario(sc, wire)
        result["scenarios"][sc.name] = r
        base = r["per_reading"]
        rows = [
            (
                "one JSON publish per reading (talk)",
                fmt_bytes(base["payload_bytes"]),
                fmt_bytes(base["wire_bytes"]),
                f"{base['calls']:,}",
                fmt_bytes(base["billable_bytes"]),
                f"{base['s3_puts']:,}",
                "",
                "",
                "",
            )
        ]
        for name, d in r["designs"].items():
            rows.append(
                (
                    name,
                    fmt_bytes(d["payload_bytes"]),
                    fmt_bytes(d["wire_bytes"]),
                    f"{d['calls']:,}",
                    fmt_bytes(d["billable_bytes"]) if d["billable_bytes"] else "-",
                    f"{d['s3_puts']:,}",
                    f"{d['fewer_bytes_x']}x",
                    f"{d['fewer_calls_x']}x",
                    f"{d['fewer_billable_x']}x" if d["fewer_billable_x"] else "-",
                )
            )
        table(
            f"Economics — {sc.name} ({sc.readings:,} readings)",
            [
                "design",
                "payload",
                "wire",
                "API calls",
                "Firehose billable",
                "S3 PUTs",
                "fewer bytes",
                "fewer calls",
                "fewer billable",
            ],
            rows,
            caption="targets: ≥50x fewer billable bytes, ≥100x fewer calls, ≥10x fewer "
            "bytes. Per-reading calls = the device's IoT Core publishes; its IoT "
            "rule makes as many Firehose PutRecord calls again (not counted here).",
        )
    write_json("economics", result)
    return result


if __name__ == "__main__":
    main()
