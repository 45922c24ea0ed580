"""collector.testing.run_pipeline: a whole config on golden input, in fake time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl

from collector.testing import run_pipeline

CONFIG = """
device: gw
sources: [{name: room, type: simulated}]
transforms:
  - {type: filter, where: "value BETWEEN -40 AND 85"}
  - {type: window, every: 1m, aggs: [mean, count]}
sinks:
  - {name: lake, type: lake, batch: {max_age: 1m}}
  - {name: hot, type: console, where: "mean > 30"}
"""


def test_golden_input_gives_golden_output_without_waiting() -> None:
    t0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    ticks = [
        (t0 + timedelta(seconds=20 * i), {"temperature": v})
        for i, v in enumerate([20.0, 22.0, 999.0, 31.0, 35.0, 27.0, 19.0, 25.0])
    ]
    out = run_pipeline(CONFIG, ticks)
    lake = out["lake"].sort("ts")
    assert lake.select("ts", "mean", "count", "partial").rows() == [
        (t0, 21.0, 2, False),  # 999 filtered out
        (t0 + timedelta(minutes=1), 31.0, 3, False),
        (t0 + timedelta(minutes=2), 22.0, 2, True),  # still open at the stop
    ]
    # max_age 1m in fake time: the first window waited a minute when the second closed
    ids = lake.get_column("batch_id").to_list()
    assert ids[0] != ids[1] == ids[2]
    assert out["hot"].get_column("mean").to_list() == [31.0]
    assert out["hot"].get_column("record_id").str.starts_with("test-00000000-").all()


def test_rows_without_ts_take_the_tick_time() -> None:
    t0 = datetime(2024, 6, 1, tzinfo=UTC)
    out = run_pipeline(
        "sources: [{type: simulated}]\nsinks: [{name: out, type: console}]",
        [
            (t0, [{"metric": "m", "value": 1.0}]),
            (t0 + timedelta(hours=1), pl.DataFrame({"m": [2.0]})),
        ],
    )
    assert out["out"].select("ts", "metric", "value").rows() == [
        (t0, "m", 1.0),
        (t0 + timedelta(hours=1), "m", 2.0),
    ]
