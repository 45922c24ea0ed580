"""Deadband: report by exception per series, with delta, percent and a max-silence heartbeat."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from pydantic import ValidationError

from collector.plugin import Context
from collector.schema import empty_readings
from collector.testing import restart_transform
from collector.transforms.deadband import DeadbandConfig, DeadbandTransform

from .conftest import readings


def make(ctx: Context, **cfg: Any) -> DeadbandTransform:
    return DeadbandTransform(DeadbandConfig.model_validate({"type": "deadband", **cfg}), ctx)


def values(df: pl.DataFrame) -> list[tuple[str, float | None]]:
    return list(zip(df["device"], df["value"], strict=True))


def test_delta_compares_with_last_emitted_not_last_seen(ctx: Context) -> None:
    t = make(ctx, delta=0.5)
    df = readings([(i, "a", "t", v) for i, v in enumerate([20.0, 20.3, 20.6, 20.4, 19.9, 21.0])])
    # 20.3 and 20.4 stay within 0.5 of 20.0; 20.6 > 20.0 + 0.5; 19.9 is 0.7 below 20.6.
    assert t.apply(df)["value"].to_list() == [20.0, 20.6, 19.9, 21.0]


def test_series_are_independent_and_first_reading_always_emitted(ctx: Context) -> None:
    t = make(ctx, delta=1)
    df = readings([(0, "a", "t", 5.0), (0, "b", "t", 5.0), (1, "a", "t", 5.5),
                   (1, "b", "t", 7.0), (2, "a", "h", 5.2)])
    assert values(t.apply(df)) == [("a", 5.0), ("b", 5.0), ("b", 7.0), ("a", 5.2)]


def test_percent_threshold(ctx: Context) -> None:
    t = make(ctx, percent=10)
    df = readings([(i, "a", "t", v) for i, v in enumerate([100.0, 109.0, 111.0, 101.0, 99.0])])
    # 111 > 100 + 10%; then the band is 11.1 around 111: 101 is out? |101-111| = 10 < 11.1.
    assert t.apply(df)["value"].to_list() == [100.0, 111.0, 99.0]


def test_max_silence_heartbeat_and_state_across_batches(ctx: Context) -> None:
    t = make(ctx, delta=5, max_silence="1m")
    first = t.apply(readings([(0, "a", "t", 1.0), (30, "a", "t", 1.1)]))
    assert first["value"].to_list() == [1.0]
    clone = restart_transform(t, ctx)
    second = clone.apply(readings([(59, "a", "t", 1.2), (60, "a", "t", 1.3), (90, "a", "t", 1.4)]))
    assert second["value"].to_list() == [1.3]


def test_default_emits_changes_only_and_handles_nulls(ctx: Context) -> None:
    t = make(ctx)
    df = readings([(i, "a", "t", v) for i, v in enumerate([1.0, 1.0, None, None, 1.0, 2.0])])
    assert t.apply(df)["value"].to_list() == [1.0, None, 1.0, 2.0]


def test_out_of_order_rows_are_judged_in_event_time(ctx: Context) -> None:
    t = make(ctx, delta=1)
    df = readings([(2, "a", "t", 3.0), (0, "a", "t", 1.0), (1, "a", "t", 1.5)])
    out = t.apply(df)
    assert out["value"].to_list() == [3.0, 1.0]  # original order kept, 1.5 suppressed


def test_empty_frame_and_validation(ctx: Context) -> None:
    out = make(ctx, delta=1).apply(empty_readings())
    assert out.is_empty() and out.schema == empty_readings().schema
    with pytest.raises(Exception, match="nope"):
        make(ctx, by=["nope"]).apply(empty_readings())
    with pytest.raises(ValidationError, match="not both"):
        DeadbandConfig(type="deadband", delta=1, percent=2)
    with pytest.raises(ValidationError):
        DeadbandConfig(type="deadband", delta=-1)
