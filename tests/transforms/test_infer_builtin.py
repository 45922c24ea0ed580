"""The built-in detector on the `simulated` source: finds injected anomalies, keeps state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
import pytest

from collector.plugin import Context
from collector.testing import restart_transform
from collector.transforms.infer import InferConfig, InferTransform

from .conftest import simulated_batches

SIM = {
    "seed": 42,
    "every": "5s",
    "start": "2024-01-01T00:00:00Z",
    "devices": 2,
    "metrics": {
        "temperature": {"kind": "uniform", "min": 0, "max": 30, "unit": "C"},
        "pressure": {"kind": "walk", "start": 1000, "step": 0.5, "unit": "hPa"},
        "vibration": {"kind": "sine", "period": "60s", "amplitude": 1, "noise": 0.05},
    },
    "anomalies": {"rate": 0.01, "magnitude": 8},
    "dropouts": {"rate": 0.01},
    "label_anomalies": True,
}


def infer(ctx: Context, **config: Any) -> InferTransform:
    return InferTransform(InferConfig.model_validate({"type": "infer", **config}), ctx)


def run(transform: InferTransform, batches: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat([transform.apply(b) for b in batches])


def recall_fpr(out: pl.DataFrame) -> tuple[float, float, int, int]:
    """Over every labelled reading: a warm-up row (prediction null) counts as not flagged."""
    flagged = pl.col("prediction").fill_null(0.0) == 1.0
    truth = pl.col("anomaly") == "1"
    positives = out.filter(truth)
    negatives = out.filter(~truth)
    recall = positives.filter(flagged).height / positives.height
    fpr = negatives.filter(flagged).height / negatives.height
    return recall, fpr, positives.height, negatives.height


@pytest.mark.parametrize(
    ("metrics", "model"),
    [
        (["temperature", "vibration"], {"method": "zscore"}),
        (["pressure"], {"method": "ewma", "alpha": 0.5}),
    ],
)
def test_finds_injected_anomalies(
    make_ctx: Callable[[str], Context], metrics: list[str], model: dict[str, Any]
) -> None:
    batches = simulated_batches(SIM, ticks=3000, per_batch=25)
    t = infer(make_ctx("infer"), model={"kind": "builtin", **model}, features={"metrics": metrics})
    out = run(t, batches).filter(pl.col("metric").is_in(metrics))
    for metric in metrics:
        recall, fpr, pos, neg = recall_fpr(out.filter(pl.col("metric") == metric))
        assert pos >= 40 and neg >= 5000, (metric, pos, neg)  # the run really has anomalies
        assert recall >= 0.9, (metric, recall)
        assert fpr <= 0.01, (metric, fpr)


def test_other_metrics_pass_through_untouched(make_ctx: Callable[[str], Context]) -> None:
    batches = simulated_batches(SIM, ticks=200, per_batch=50)
    t = infer(make_ctx("infer"), features={"metrics": ["temperature"]})
    out = run(t, batches)
    raw = pl.concat(batches)
    assert out.select(raw.columns).equals(raw)  # rows, order and values unchanged
    others = out.filter(pl.col("metric") != "temperature")
    assert others["prediction"].null_count() == others.height
    assert others["confidence"].null_count() == others.height
    temps = out.filter(pl.col("metric") == "temperature")
    assert temps["confidence"].null_count() == 0
    assert temps["confidence"].is_between(0, 1).all()


def test_warm_up_rows_are_unsure_not_lost(make_ctx: Callable[[str], Context]) -> None:
    batches = simulated_batches(SIM, ticks=100, per_batch=7)
    t = infer(make_ctx("infer"), model={"warmup": 30, "window": 40},
              features={"metrics": ["temperature"]})
    out = run(t, batches).filter(pl.col("metric") == "temperature").sort("device", "ts")
    for _, series in out.group_by("device"):
        first = series.head(30)
        assert first["prediction"].null_count() == 30
        assert (first["confidence"] == 0.0).all()  # routes with `confidence < x`
        assert series.slice(30)["prediction"].null_count() == 0


def test_checkpoint_mid_stream_gives_the_same_flags(make_ctx: Callable[[str], Context]) -> None:
    batches = simulated_batches(SIM, ticks=1200, per_batch=20)
    config = {"model": {"method": "ewma", "alpha": 0.5}, "features": {"metrics": ["pressure"]},
              "window_column": "window_values"}
    straight = run(infer(make_ctx("a"), **config), batches)

    first = infer(make_ctx("b"), **config)
    head = run(first, batches[:30])
    restored = restart_transform(first, make_ctx("b"))
    tail = run(restored, batches[30:])
    assert pl.concat([head, tail]).equals(straight)


def test_level_shift_is_accepted_after_reset(make_ctx: Callable[[str], Context]) -> None:
    """A sensor moved for good is re-learnt, not flagged for the rest of its life."""
    import datetime as dt

    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    values = [20.0 + 0.1 * ((i * 7) % 11 - 5) for i in range(200)]
    values += [60.0 + 0.1 * ((i * 7) % 11 - 5) for i in range(200)]
    df = pl.DataFrame({
        "ts": [start + dt.timedelta(seconds=i) for i in range(400)],
        "device": "d1", "source": "s", "metric": "t", "value": values, "unit": None,
    }).cast({"ts": pl.Datetime("us", "UTC"), "unit": pl.String})
    t = infer(make_ctx("infer"), model={"reset_after": 5, "warmup": 20, "window": 40})
    out = run(t, [df.slice(i, 10) for i in range(0, 400, 10)])
    shifted = out.slice(200)
    assert shifted.head(5)["prediction"].to_list() == [1.0] * 5
    assert shifted.slice(5 + 20)["prediction"].sum() == 0  # re-warmed on the new level


def test_window_column_holds_the_raw_readings(make_ctx: Callable[[str], Context]) -> None:
    batches = simulated_batches(SIM, ticks=120, per_batch=9)
    t = infer(make_ctx("infer"), model={"window": 50, "warmup": 10},
              features={"metrics": ["temperature"]}, window_column="window_values")
    out = run(t, batches).filter(pl.col("metric") == "temperature")
    for _, series in out.sort("ts").group_by("device", maintain_order=True):
        values = series["value"].to_list()
        windows = series["window_values"].to_list()
        for i in (0, 5, 49, 50, 110):
            assert windows[i] == values[max(0, i - 50): i + 1]
