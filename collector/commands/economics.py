"""The Firehose cost model behind `collector check --estimate`, the economics test and benchmarks.

Firehose bills ingestion per record rounded up to a 5 KB increment, and each PutRecordBatch call
is limited to 500 records and 4 MiB. So the cost of a day of readings depends on how readings are
packed into records, which this module computes for a rate and an average NDJSON line size:

- ``packed``: lines packed into records of at most ``record_target_bytes`` (the sink's way);
- ``per_reading``: one record per reading (the naive way).

Pure arithmetic, no I/O. Feed it the measured size of real NDJSON lines
(``bytes_per_reading``), not a guess: ``sinks.firehose.ndjson_lines`` makes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import polars as pl

MAX_RECORDS_PER_CALL = 500
MAX_REQUEST_BYTES = 4 * 1024**2
BILLING_INCREMENT = 5 * 1024
"""Per-record rounding. AWS says "5KB"; 5 KiB is the pessimistic reading for packed records,
and our default record target (49,900 bytes) stays under 10 increments in either reading."""
SECONDS_PER_DAY = 86_400


def billable(record_bytes: float, increment: int = BILLING_INCREMENT) -> int:
    """Bytes Firehose bills for one record of ``record_bytes``."""
    return max(1, math.ceil(record_bytes / increment)) * increment


def readings_per_day(sensors: int, hz: float, metrics_per_sensor: int = 1) -> float:
    """Readings a day for ``sensors`` each sampling ``metrics_per_sensor`` values at ``hz``."""
    return sensors * metrics_per_sensor * hz * SECONDS_PER_DAY


def _plan(
    readings: float,
    bytes_per_reading: float,
    lines_per_record: int,
    max_records_per_call: int,
    max_request_bytes: int,
    readings_per_batch: float | None,
) -> dict[str, float]:
    """Records, calls and billable bytes of ``readings`` lines cut into batches."""
    if readings <= 0:
        return {"records": 0, "calls": 0, "bytes": 0, "billable_bytes": 0}
    batch = readings if readings_per_batch is None else min(readings_per_batch, readings)
    batch = max(1, round(batch))
    batches = readings / batch
    full_records, rest = divmod(batch, lines_per_record)
    full_bytes = lines_per_record * bytes_per_reading
    records_per_batch = full_records + (1 if rest > 0 else 0)
    billable_per_batch = full_records * billable(full_bytes) + (
        billable(rest * bytes_per_reading) if rest > 0 else 0
    )
    per_call = max(1, min(max_records_per_call, int(max_request_bytes // max(full_bytes, 1))))
    calls_per_batch = math.ceil(records_per_batch / per_call)
    return {
        "records": records_per_batch * batches,
        "calls": calls_per_batch * batches,
        "bytes": readings * bytes_per_reading,
        "billable_bytes": billable_per_batch * batches,
    }


def firehose_costs(
    readings_per_day: float,
    bytes_per_reading: float,
    record_target_bytes: int = 49_900,
    max_records_per_call: int = MAX_RECORDS_PER_CALL,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    readings_per_batch: float | None = None,
    compression_ratio: float = 1.0,
) -> dict[str, Any]:
    """Records, calls and billable bytes per day, packed vs one record per reading.

    ``compression_ratio`` (raw/compressed, measured) models the sink's ``compression: gzip``;
    it applies to the packed plan only: a lone gzip'ed reading is still billed 5 KB.

    ``readings_per_batch`` (rows per batch the runtime cuts, e.g. rate x ``batch.max_age``)
    counts the last, partly filled record of every batch; ``None`` models one endless batch.
    Returns ``{"packed": {...}, "per_reading": {...}, "billable_ratio": per_reading/packed,
    "calls_ratio": ...}`` with ``records``, ``calls``, ``bytes``, ``billable_bytes`` per day.
    """
    if bytes_per_reading <= 0:
        raise ValueError("bytes_per_reading must be positive")
    if compression_ratio < 1:
        raise ValueError("compression_ratio is raw/compressed, at least 1")
    wire = bytes_per_reading / compression_ratio
    lines_per_record = max(1, int(record_target_bytes // wire))
    packed = _plan(
        readings_per_day, wire, lines_per_record, max_records_per_call,
        max_request_bytes, readings_per_batch,
    )
    naive = _plan(
        readings_per_day, bytes_per_reading, 1, max_records_per_call, max_request_bytes,
        readings_per_batch,
    )
    return {
        "readings_per_day": readings_per_day,
        "bytes_per_reading": bytes_per_reading,
        "readings_per_record": lines_per_record,
        "compression_ratio": compression_ratio,
        "packed": packed,
        "per_reading": naive,
        "billable_ratio": naive["billable_bytes"] / packed["billable_bytes"]
        if packed["billable_bytes"]
        else math.inf,
        "calls_ratio": naive["calls"] / packed["calls"] if packed["calls"] else math.inf,
    }


def format_estimate(costs: dict[str, Any], name: str = "firehose") -> str:
    """Human lines for `collector check --estimate`."""
    p, n = costs["packed"], costs["per_reading"]

    def gb(x: float) -> str:
        return f"{x / 1e9:.3f} GB"

    return "\n".join(
        [
            f"{name}: {costs['readings_per_day']:,.0f} readings/day x "
            f"{costs['bytes_per_reading']:.0f} B, {costs['readings_per_record']:.0f} per record",
            f"  packed:      {p['records']:>14,.0f} records {p['calls']:>12,.0f} calls "
            f"{gb(p['billable_bytes']):>14} billable/day",
            f"  one/reading: {n['records']:>14,.0f} records {n['calls']:>12,.0f} calls "
            f"{gb(n['billable_bytes']):>14} billable/day",
            f"  packing bills {costs['billable_ratio']:.0f}x fewer bytes, "
            f"makes {costs['calls_ratio']:.0f}x fewer calls",
        ]
    )


def _sample_batch(
    sink_config: Any,
    readings_per_second: float,
    device: str,
    source: str,
    metrics: Sequence[str],
    unit: str | None,
    seed: int,
) -> tuple[pl.DataFrame, float]:
    """One batch of canonical readings as the runtime would cut it for this sink
    (``min(batch.max_rows, rate x batch.max_age)`` rows, random values, record ids of the
    real format), and the readings per day."""
    import random
    from datetime import UTC, datetime, timedelta

    from collector.runtime.identity import batch_id as make_batch_id
    from collector.runtime.identity import batch_prefix
    from collector.schema import POLARS_SCHEMA, RECORD_ID

    per_day = readings_per_second * SECONDS_PER_DAY
    batch = sink_config.batch
    rows = max(1, min(int(batch.max_rows), round(readings_per_second * batch.max_age)))
    rows = min(rows, max(1, round(per_day)))
    rnd = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    batch_id = make_batch_id(batch_prefix(device, "00000000"), 0, rows - 1)
    table = pl.DataFrame(
        {
            "ts": [
                start + timedelta(seconds=i / max(readings_per_second, 1e-9)) for i in range(rows)
            ],
            "device": [device] * rows,
            "source": [source] * rows,
            "metric": [metrics[i % len(metrics)] for i in range(rows)],
            "value": [rnd.uniform(0, 30) for _ in range(rows)],
            "unit": [unit] * rows,
            RECORD_ID: [f"{batch_id}:{i}" for i in range(rows)],
        },
        schema={**POLARS_SCHEMA, RECORD_ID: pl.String},
    )
    return table, per_day


def estimate_sink(
    sink_config: Any,
    readings_per_second: float,
    *,
    device: str = "edge-01",
    source: str = "room",
    metrics: Sequence[str] = ("temperature",),
    unit: str | None = "C",
    seed: int = 0,
) -> dict[str, Any]:
    """`collector check --estimate` for one ``firehose`` sink, measured rather than modelled.

    Builds one batch of canonical readings as the runtime would cut it for this sink
    (``min(batch.max_rows, rate x batch.max_age)`` rows, random values, real record ids),
    packs it with the sink's own packer and settings (``record_target_bytes``,
    ``compression``, call limits), and scales to a day. Same keys as ``firehose_costs``.
    """
    from sinks.firehose import calls, ndjson_lines, pack, pack_gzip

    table, per_day = _sample_batch(
        sink_config, readings_per_second, device, source, metrics, unit, seed
    )
    rows = table.height
    lines = ndjson_lines(table)
    packer = pack_gzip if getattr(sink_config, "compression", "none") == "gzip" else pack
    packed = packer(lines, sink_config.record_target_bytes)
    n_calls = len(calls(packed, sink_config.max_records_per_call, sink_config.max_request_bytes))
    naive_calls = -(-rows // sink_config.max_records_per_call)
    batches = per_day / rows
    raw = sum(map(len, lines))
    sent = sum(len(p.data) for p in packed)
    packed_plan = {
        "records": len(packed) * batches,
        "calls": n_calls * batches,
        "bytes": sent * batches,
        "billable_bytes": sum(billable(len(p.data)) for p in packed) * batches,
    }
    naive = {
        "records": rows * batches,
        "calls": naive_calls * batches,
        "bytes": raw * batches,
        "billable_bytes": sum(billable(len(x)) for x in lines) * batches,
    }
    return {
        "readings_per_day": per_day,
        "bytes_per_reading": raw / rows,
        "readings_per_record": rows / len(packed),
        "readings_per_batch": rows,
        "compression_ratio": raw / sent,
        "packed": packed_plan,
        "per_reading": naive,
        "billable_ratio": naive["billable_bytes"] / packed_plan["billable_bytes"],
        "calls_ratio": naive["calls"] / packed_plan["calls"],
    }


def estimate_mqtt_sink(
    sink_config: Any,
    readings_per_second: float,
    *,
    device: str = "edge-01",
    source: str = "room",
    metrics: Sequence[str] = ("temperature",),
    unit: str | None = "C",
    seed: int = 0,
) -> dict[str, Any]:
    """`collector check --estimate` for one ``mqtt`` sink: messages and IoT Core metered 5 KB
    units per day, packed by the sink's own planner (topic template, format, payload target)
    against the talk's one JSON message per reading. Measured on one batch as the runtime cuts
    it (``min(batch.max_rows, rate x batch.max_age)`` rows), scaled to a day."""
    from sinks.firehose import ndjson_lines
    from sinks.mqtt import BASIC_INGEST, metered_units, plan

    table, per_day = _sample_batch(
        sink_config, readings_per_second, device, source, metrics, unit, seed
    )
    rows = table.height
    packed = plan(table, sink_config)
    single = [line.rstrip(b"\n") for line in ndjson_lines(table)]  # one JSON object each
    batches = per_day / rows
    sent = sum(len(m.payload) for m in packed.messages)
    units = sum(metered_units(len(m.payload)) for m in packed.messages)
    naive_units = sum(metered_units(len(x)) for x in single)
    return {
        "readings_per_day": per_day,
        "readings_per_batch": rows,
        "bytes_per_reading": sum(map(len, single)) / rows,
        "readings_per_message": rows / max(1, len(packed.messages)),
        "basic_ingest": bool(BASIC_INGEST.match(sink_config.topic)),
        "packed": {
            "messages": len(packed.messages) * batches,
            "metered_units": units * batches,
            "bytes": sent * batches,
        },
        "per_reading": {
            "messages": rows * batches,
            "metered_units": naive_units * batches,
            "bytes": sum(map(len, single)) * batches,
        },
        "units_ratio": naive_units / units if units else math.inf,
        "messages_ratio": rows / len(packed.messages) if packed.messages else math.inf,
    }


def format_mqtt_estimate(costs: dict[str, Any], name: str = "mqtt") -> str:
    """Human lines for `collector check --estimate` of an ``mqtt`` sink."""
    p, n = costs["packed"], costs["per_reading"]
    lines = [
        f"{name}: {costs['readings_per_day']:,.0f} readings/day x "
        f"{costs['bytes_per_reading']:.0f} B, {costs['readings_per_message']:.0f} per message",
        f"  packed:      {p['messages']:>14,.0f} messages {p['metered_units']:>14,.0f} "
        "metered 5 KB units/day",
        f"  one/reading: {n['messages']:>14,.0f} messages {n['metered_units']:>14,.0f} "
        "metered 5 KB units/day",
        f"  packing meters {costs['units_ratio']:.0f}x fewer units, "
        f"sends {costs['messages_ratio']:.0f}x fewer messages",
    ]
    if costs.get("basic_ingest"):
        lines.append("  Basic Ingest topic: no IoT Core messaging charge (rule actions still bill)")
    return "\n".join(lines)
