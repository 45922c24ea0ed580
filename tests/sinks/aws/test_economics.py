"""Firehose economics: packing vs one record per reading, from real NDJSON lines.

Billable bytes come from the real packer on real lines of the canonical schema (values from the
`simulated` source, record ids in the runtime's format), cut into the batches the sink's default
`batch` settings produce; the cost model in `collector.commands.economics` must agree with them.

What the numbers say (asserted below): one record per reading is billed 5 KiB for a ~170-byte
line, so plain NDJSON packing saves at most 5120/170 ~ 30x, whatever the rate. ``compression:
gzip`` packs ~8x more readings per billed byte, which is what clears 50x.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from collector.commands.economics import (
    billable,
    firehose_costs,
    format_estimate,
    readings_per_day,
)
from collector.schema import POLARS_SCHEMA, RECORD_ID
from collector.sources.simulated import SimulatedConfig, generate
from sinks.firehose import FirehoseConfig, calls, ndjson_lines, pack, pack_gzip

START = datetime(2024, 1, 1, tzinfo=UTC)
SCHEMA: dict[str, pl.DataType] = {**POLARS_SCHEMA, RECORD_ID: pl.String()}


def batch_table(
    cfg: SimulatedConfig, first_tick: int, ticks: int, offset: int
) -> pl.DataFrame:
    """The readings of ``ticks`` ticks as the runtime hands them to a sink (with record ids)."""
    rows = []
    for tick in range(first_tick, first_tick + ticks):
        for r in generate(cfg, "edge-01", tick, START):
            rows.append({"device": "edge-01", "source": "room", **r})
    batch_id = f"{offset:012d}-{offset + len(rows) - 1:012d}"
    cols = {name: [r.get(name) for r in rows] for name in POLARS_SCHEMA}
    cols[RECORD_ID] = [f"{batch_id}:{i}" for i in range(len(rows))]
    return pl.DataFrame(cols, schema=SCHEMA)


def measured(tables: list[pl.DataFrame], fh: FirehoseConfig, gzip: bool) -> dict[str, float]:
    """Records, calls and billable bytes of these batches as the sink really packs them."""
    records = n_calls = bill = 0
    for t in tables:
        lines = ndjson_lines(t)
        packed = (pack_gzip if gzip else pack)(lines, fh.record_target_bytes)
        assert all(len(p.data) <= fh.record_target_bytes for p in packed if len(p.rows) > 1)
        records += len(packed)
        n_calls += len(calls(packed, fh.max_records_per_call, fh.max_request_bytes))
        bill += sum(billable(len(p.data)) for p in packed)
    return {"records": records, "calls": n_calls, "billable_bytes": bill}


def per_reading(tables: list[pl.DataFrame]) -> dict[str, float]:
    lines = [line for t in tables for line in ndjson_lines(t)]
    return {"records": len(lines), "billable_bytes": sum(billable(len(x)) for x in lines)}


FH = FirehoseConfig(type="firehose", stream="s")  # the sink's defaults: 49,900 B, 5m batches


def test_talks_demo_one_day():
    """One temperature every 5 s for a day (17,280 readings), 5-minute batches."""
    cfg = SimulatedConfig(every="5s", seed=1, start=START)
    ticks_per_batch = int(FH.batch.max_age // 5)  # 60
    tables = [batch_table(cfg, t, ticks_per_batch, t) for t in range(0, 17_280, ticks_per_batch)]
    assert sum(t.height for t in tables) == 17_280 == readings_per_day(1, 1 / 5)

    naive = per_reading(tables)
    plain = measured(tables, FH, gzip=False)
    gz = measured(tables, FH, gzip=True)
    bytes_per_reading = sum(sum(map(len, ndjson_lines(t))) for t in tables) / 17_280
    assert 140 < bytes_per_reading < 200  # a real canonical line, record id included

    # the model agrees with the real packer
    model = firehose_costs(17_280, bytes_per_reading, FH.record_target_bytes,
                           readings_per_batch=ticks_per_batch)
    assert model["per_reading"]["billable_bytes"] == naive["billable_bytes"]
    assert model["packed"]["records"] == pytest.approx(plain["records"], rel=0.05)
    assert model["packed"]["billable_bytes"] == pytest.approx(plain["billable_bytes"], rel=0.15)

    plain_ratio = naive["billable_bytes"] / plain["billable_bytes"]
    gzip_ratio = naive["billable_bytes"] / gz["billable_bytes"]
    assert plain_ratio >= 15  # 60 readings = 10 KB -> 3 increments instead of 60
    assert gzip_ratio >= 50  # 60 readings gzip into one 5 KB increment
    assert naive["records"] / gz["records"] >= 50


def test_fleet_100_sensors_at_1hz():
    """100 sensors at 1 Hz (8.64 M readings/day): one real 5-minute batch, times 288."""
    cfg = SimulatedConfig(every="1s", seed=2, start=START, devices=100)
    per_batch = int(min(FH.batch.max_rows, 100 * FH.batch.max_age))  # max_rows cuts: 10,000
    table = batch_table(cfg, 0, per_batch // 100, 0)
    assert table.height == per_batch
    batches_per_day = readings_per_day(100, 1.0) / per_batch

    naive = per_reading([table])
    plain = measured([table], FH, gzip=False)
    gz = measured([table], FH, gzip=True)
    day = {k: {m: v * batches_per_day for m, v in d.items()}
           for k, d in {"naive": naive, "plain": plain, "gzip": gz}.items()}

    plain_ratio = day["naive"]["billable_bytes"] / day["plain"]["billable_bytes"]
    gzip_ratio = day["naive"]["billable_bytes"] / day["gzip"]["billable_bytes"]
    line = sum(map(len, ndjson_lines(table))) / table.height
    assert plain_ratio == pytest.approx(5 * 1024 / line, rel=0.1)  # the physical bound
    assert plain_ratio >= 25
    assert gzip_ratio >= 50
    # calls: 500-record calls for one per reading vs 4 MiB calls of packed records
    naive_calls = -(-table.height // 500) * batches_per_day
    assert naive_calls / day["plain"]["calls"] >= 10

    model = firehose_costs(readings_per_day(100, 1.0), line, FH.record_target_bytes,
                           readings_per_batch=per_batch)
    assert model["billable_ratio"] == pytest.approx(plain_ratio, rel=0.05)
    ratio = sum(map(len, ndjson_lines(table))) / sum(len(p.data) for p in
                                                       pack_gzip(ndjson_lines(table), 49_900))
    model_gz = firehose_costs(readings_per_day(100, 1.0), line, FH.record_target_bytes,
                              readings_per_batch=per_batch, compression_ratio=ratio)
    assert model_gz["billable_ratio"] == pytest.approx(gzip_ratio, rel=0.1)
    text = format_estimate(model_gz)
    assert "billable/day" in text and "fewer bytes" in text


def test_small_batches_pack_little():
    """The honest caveat: packing only works within a batch (10 s of a 0.2 Hz sensor = 2)."""
    costs = firehose_costs(17_280, 170, readings_per_batch=2)
    assert costs["billable_ratio"] == pytest.approx(2.0)
    assert costs["packed"]["records"] == 8_640


def test_model_edge_cases():
    assert billable(1) == billable(5 * 1024) == 5 * 1024
    assert billable(5 * 1024 + 1) == 10 * 1024
    assert billable(49_900) == 10 * 5 * 1024 and billable(49_900, 5_000) == 50_000
    zero = firehose_costs(0, 170)
    assert zero["packed"]["records"] == 0
    with pytest.raises(ValueError):
        firehose_costs(10, 0)
    one = firehose_costs(1_000_000, 1_000, readings_per_batch=None)
    assert one["readings_per_record"] == 49
    per_call = 4 * 1024**2 // 49_000  # 85 packed records fit in 4 MiB
    assert one["packed"]["calls"] == -(-one["packed"]["records"] // per_call)


def test_default_record_target_is_under_a_5kb_multiple():
    target = FH.record_target_bytes
    assert target % 5_000 > 4_800 or target % 5_000 == 0 or target < 5_000
    assert billable(target, 5_000) == 50_000 and billable(target, 5_120) == 51_200
    assert timedelta(seconds=FH.batch.max_age) == timedelta(minutes=5)


def test_estimate_sink_measures_with_the_sinks_own_settings():
    """What `collector check --estimate` prints, for the sink's real settings."""
    from collector.commands.economics import estimate_sink

    demo = estimate_sink(FH, 0.2)
    assert demo["readings_per_batch"] == 60
    assert demo["per_reading"]["records"] == pytest.approx(17_280)
    # 60 NDJSON lines of ~185 bytes (record ids carry device and instance id): three 5 KB units
    assert demo["billable_ratio"] == pytest.approx(20, rel=0.1)
    gz = estimate_sink(FirehoseConfig(type="firehose", stream="s", compression="gzip"), 100)
    assert gz["readings_per_batch"] == 10_000 and gz["billable_ratio"] >= 50
    short = estimate_sink(FirehoseConfig(type="firehose", stream="s", batch={"max_age": "10s"}),
                          0.2)
    assert short["billable_ratio"] == pytest.approx(2.0)
    assert "2x fewer bytes" in format_estimate(short)
