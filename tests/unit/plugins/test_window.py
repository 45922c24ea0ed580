"""The window transform against an independent, plain-Python computation of the same windows."""

from __future__ import annotations

import math
import random
import statistics
from datetime import timedelta
from typing import Any

import polars as pl
import pytest
from pydantic import ValidationError

from collector.plugin import Context
from collector.schema import empty_readings
from collector.testing import restart_transform
from collector.transforms.window import WindowConfig, WindowTransform

from .conftest import T0, readings

ALL_AGGS = ["mean", "min", "max", "sum", "count", "first", "last", "std", "p50", "p95"]


def make(ctx: Context, **cfg: Any) -> WindowTransform:
    return WindowTransform(WindowConfig.model_validate({"type": "window", **cfg}), ctx)


def stream(rows: int, seed: int) -> list[tuple[float, str, str, float | None, str]]:
    """Readings for 3 devices x 2 metrics, mostly in order, some a few seconds late, some null."""
    rng = random.Random(seed)
    out = []
    t = 0.0
    for _ in range(rows):
        t += rng.uniform(0, 2)
        ts = max(0.0, t - rng.uniform(0, 15)) if rng.random() < 0.1 else t
        value = None if rng.random() < 0.05 else round(rng.gauss(20, 5), 3)
        metric = rng.choice(["t", "h"])
        out.append((round(ts, 3), rng.choice(["a", "b", "c"]), metric, value,
                    "C" if metric == "t" else "%"))
    return out


def expected(rows: list[tuple[float, str, str, float | None, str]], every: float,
             lateness: float) -> tuple[dict[tuple[Any, ...], dict[str, Any]], int]:
    """Windows (closed and open, with the partial flag) and the number of late rows."""
    windows: dict[tuple[Any, ...], list[tuple[float, float | None, str]]] = {}
    max_ts: float | None = None
    late = 0
    for sec, dev, metric, value, unit in rows:
        start = math.floor(sec / every) * every
        if max_ts is not None and start + every <= max_ts - lateness:
            late += 1
            continue
        windows.setdefault((start, dev, "s", metric), []).append((sec, value, unit))
        max_ts = sec if max_ts is None else max(max_ts, sec)
    assert max_ts is not None
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key, items in windows.items():
        ordered = sorted(items, key=lambda x: x[0])  # stable: ties keep arrival order
        vals = [v for _, v, _ in ordered if v is not None]
        n = len(vals)
        out[(T0 + timedelta(seconds=key[0]), *key[1:])] = {
            "unit": ordered[0][2],
            "mean": statistics.fmean(vals) if n else None,
            "min": min(vals) if n else None,
            "max": max(vals) if n else None,
            "sum": math.fsum(vals),
            "count": n,
            "first": vals[0] if n else None,
            "last": vals[-1] if n else None,
            "std": statistics.stdev(vals) if n > 1 else None,
            "p50": statistics.median(vals) if n else None,
            "p95": (statistics.quantiles(vals, n=100, method="inclusive")[94] if n > 1
                    else (vals[0] if n else None)),
            "partial": not key[0] + every <= max_ts - lateness,
        }
    return out, late


def as_dict(df: pl.DataFrame) -> dict[tuple[Any, ...], dict[str, Any]]:
    out = {}
    for r in df.to_dicts():
        key = (r.pop("ts"), r.pop("device"), r.pop("source"), r.pop("metric"))
        assert key not in out, f"window {key} emitted twice"
        out[key] = r
    return out


def run_batches(t: WindowTransform, df: pl.DataFrame, sizes: list[int]) -> pl.DataFrame:
    outs, pos = [], 0
    for size in sizes:
        outs.append(t.apply(df.slice(pos, size)))
        pos += size
    outs.append(t.apply(df.slice(pos)))
    flushed = t.flush()
    if flushed is not None:
        outs.append(flushed)
    return pl.concat(outs)


@pytest.mark.parametrize("lateness", [0.0, 7.0])
def test_aggregates_match_an_independent_computation(ctx: Context, lateness: float) -> None:
    rows = stream(3000, seed=11)
    df = readings(rows)
    t = make(ctx, every="10s", aggs=ALL_AGGS, allowed_lateness=lateness)
    out = run_batches(t, df, [1, 17, 500, 999, 3])
    want, late = expected(rows, 10.0, lateness)
    got = as_dict(out)
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        for name, value in w.items():
            if isinstance(value, float):
                assert g[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (key, name)
            else:
                assert g[name] == value, (key, name)
    assert late > 0
    assert ctx.counters.get("late_rows_total", component="comp") == late
    assert out.columns == ["ts", "device", "source", "metric", "unit", *ALL_AGGS, "partial"]


def test_output_does_not_depend_on_batching(ctx: Context) -> None:
    df = readings(stream(2000, seed=3))
    one = run_batches(make(ctx, every="30s"), df, [])
    many = run_batches(make(ctx, every="30s"), df, [7] * 250)
    key = ["ts", "device", "source", "metric"]
    assert one.sort(key).equals(many.sort(key))


def test_checkpointed_state_mid_stream_gives_identical_output(ctx: Context) -> None:
    df = readings(stream(2000, seed=5))
    straight = make(ctx, every="20s", aggs=ALL_AGGS, allowed_lateness="5s")
    expected_out = run_batches(straight, df, [300, 300, 300])

    first = make(ctx, every="20s", aggs=ALL_AGGS, allowed_lateness="5s")
    head = [first.apply(df.slice(0, 300)), first.apply(df.slice(300, 300))]
    assert first.open, "the test needs open windows at the checkpoint"
    resumed = restart_transform(first)
    del first
    tail = run_batches(resumed, df.slice(600), [300])
    assert pl.concat([*head, tail]).equals(expected_out)


@pytest.mark.parametrize("aggs", [["mean"], ALL_AGGS, ["count", "p95", "first"]])
@pytest.mark.parametrize("by", [None, ["device"]])
def test_a_batch_closing_nothing_has_the_schema_of_one_closing_a_window(
    ctx: Context, aggs: list[str], by: list[str] | None
) -> None:
    """Batches that close no window skip the group-by; their empty result must still look like
    a real one, with or without units, before and after a restart."""
    cfg: dict[str, Any] = {"every": "10s", "aggs": aggs, **({"by": by} if by else {})}
    for unit in (None, "C"):
        t = make(ctx, **cfg)
        nothing = t.apply(readings([(1, "a", "t", 1.0, unit)]))
        closing = t.apply(readings([(12, "a", "t", 2.0, unit)]))
        assert nothing.is_empty() and closing.height == 1
        assert nothing.schema == closing.schema
        resumed = restart_transform(t)
        assert resumed.apply(readings([(13, "b", "t", 3.0, unit)])).schema == closing.schema
        assert resumed.flush() is not None and resumed.flush() is None  # state came back


def test_only_closed_windows_are_emitted(ctx: Context) -> None:
    t = make(ctx, every="10s")
    assert t.apply(readings([(0, "a", "t", 1.0), (5, "a", "t", 3.0), (9.999, "a", "t", 5.0)])
                   ).is_empty()
    out = t.apply(readings([(10, "a", "t", 7.0)]))  # watermark reaches 10: [0, 10) closes
    assert out.to_dicts() == [{"ts": T0, "device": "a", "source": "s", "metric": "t",
                               "unit": None, "mean": 3.0, "min": 1.0, "max": 5.0, "count": 3,
                               "partial": False}]
    assert t.apply(readings([(19, "a", "t", 9.0)])).is_empty()
    flushed = t.flush()
    assert flushed is not None
    assert flushed.select("ts", "mean", "count", "partial").to_dicts() == [
        {"ts": T0 + timedelta(seconds=10), "mean": 8.0, "count": 2, "partial": True}]
    assert t.flush() is None


def test_allowed_lateness_keeps_windows_open_then_drops_late_rows(ctx: Context) -> None:
    t = make(ctx, every="10s", allowed_lateness="5s", aggs=["sum", "count"])
    assert t.apply(readings([(1, "a", "t", 1.0), (12, "a", "t", 100.0)])).is_empty()
    # Watermark 12 - 5 = 7 < 10: a row for [0, 10) is still accepted.
    assert t.apply(readings([(3, "a", "t", 2.0)])).is_empty()
    out = t.apply(readings([(15, "a", "t", 200.0), (4, "a", "t", 1000.0)]))
    # 15 - 5 = 10 closes [0, 10); the row at 4 came after that watermark: late.
    assert out.select("ts", "sum", "count").to_dicts() == [{"ts": T0, "sum": 3.0, "count": 2}]
    assert ctx.counters.get("late_rows_total", component="comp") == 1
    assert t.apply(readings([(2, "a", "t", 5.0)])).is_empty()
    assert ctx.counters.get("late_rows_total", component="comp") == 2
    flushed = t.flush()
    assert flushed is not None
    assert flushed.select("sum", "count", "partial").to_dicts() == [
        {"sum": 300.0, "count": 2, "partial": True}]


def test_custom_by_and_field(ctx: Context) -> None:
    t = make(ctx, every="1m", by=["metric"], field="v2", aggs=["max"])
    df = readings([(0, "a", "t", 1.0), (1, "b", "t", 2.0), (70, "a", "t", 0.0)]).with_columns(
        (pl.col("value") * 10).alias("v2"))
    out = t.apply(df)
    assert out.to_dicts() == [{"ts": T0, "metric": "t", "unit": None, "max": 20.0,
                               "partial": False}]


def test_empty_frame_gives_the_output_schema(ctx: Context) -> None:
    out = make(ctx, aggs=["mean", "count", "p95"]).apply(empty_readings(["site"]))
    assert out.is_empty()
    assert out.schema == pl.Schema({
        "ts": pl.Datetime("us", "UTC"), "device": pl.String, "source": pl.String,
        "metric": pl.String, "unit": pl.String, "mean": pl.Float64, "count": pl.Int64,
        "p95": pl.Float64, "partial": pl.Boolean})
    with pytest.raises(Exception, match="nope"):
        make(ctx, field="nope").apply(empty_readings())


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        WindowConfig.model_validate({"type": "window", "aggs": ["median"]})
    with pytest.raises(ValidationError, match="once"):
        WindowConfig.model_validate({"type": "window", "aggs": ["mean", "mean"]})
    with pytest.raises(ValidationError, match="group column"):
        WindowConfig.model_validate({"type": "window", "by": ["ts"]})
    with pytest.raises(ValidationError):
        WindowConfig.model_validate({"type": "window", "every": "0s"})
    assert WindowConfig.model_validate({"type": "window"}).every == 60.0
