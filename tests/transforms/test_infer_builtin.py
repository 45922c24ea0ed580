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
        (["temperature", "vibration", "pressure"], {}),  # the default: robust
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


def _series(values: list[float], step_s: int = 3600, metric: str = "t") -> pl.DataFrame:
    import datetime as dt

    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return pl.DataFrame({
        "ts": [start + dt.timedelta(seconds=step_s * i) for i in range(len(values))],
        "device": "d1", "source": "s", "metric": metric, "value": values, "unit": None,
    }).cast({"ts": pl.Datetime("us", "UTC"), "unit": pl.String})


def _noise(i: int) -> float:
    return 0.3 * ((i * 7919) % 13 - 6) / 6


def test_one_alarm_per_event_and_cool_down(make_ctx: Callable[[str], Context]) -> None:
    values = [10.0 + _noise(i) for i in range(300)]
    for i in [*range(100, 106), *range(109, 112), *range(200, 204)]:
        values[i] += 20.0  # a 6-reading burst, a relapse 3 readings later, a later burst
    t = infer(make_ctx("infer"), model={"cooldown": 12})
    out = run(t, [_series(values).slice(i, 25) for i in range(0, 300, 25)])
    alarms = out.filter(pl.col("alarm"))
    assert alarms.height == 2  # the relapse within the cool-down is the same event
    first, _second = alarms["event_id"].to_list()
    assert first.startswith("d1/s/t@2024-01-05T04:00:00")
    events = out.filter(pl.col("event_id").is_not_null())
    assert events.filter(pl.col("event_id") == first).height == 9  # the burst and the relapse
    assert (events["prediction"] == 1.0).all()
    assert out.filter(pl.col("event_id").is_null())["prediction"].drop_nulls().sum() == 0
    assert out.filter(pl.col("prediction").is_null())["alarm"].null_count() == 30  # warm-up


def test_min_duration_ignores_lone_spikes(make_ctx: Callable[[str], Context]) -> None:
    values = [10.0 + _noise(i) for i in range(200)]
    values[100] += 5.0  # one reading, moderately high: noise on a real sensor
    values[150] += 50.0  # one reading, far out: a spike worth an alarm on its own
    for i in range(170, 175):
        values[i] += 5.0
    df = _series(values)
    plain = run(infer(make_ctx("a")), [df])
    assert plain["alarm"].sum() == 3
    quiet = run(infer(make_ctx("b"), model={"min_duration": 2, "spike_threshold": 30}), [df])
    assert quiet.filter(pl.col("alarm"))["ts"].to_list() == [df["ts"][150], df["ts"][171]]


def test_daily_profile_is_learnt_where_the_data_has_one(
    make_ctx: Callable[[str], Context],
) -> None:
    import math

    hours = 24 * 8
    cycle = [20.0 + 8 * math.sin(2 * math.pi * (i % 24) / 24) + _noise(i) for i in range(hours)]
    flat = [20.0 + _noise(i) for i in range(hours)]
    t = infer(make_ctx("infer"))
    run(t, [pl.concat([_series(cycle, metric="cyc"), _series(flat, metric="flat")]).sort("ts")])
    assert t._detector is not None
    in_use = {k[-1]: s.robust.in_use for k, s in t._detector.series.items() if s.robust}
    assert in_use == {"cyc": "day", "flat": "none"}
    # With the profile, the last day's hourly swings are not anomalies...
    later = cycle + [20.0 + 8 * math.sin(2 * math.pi * (i % 24) / 24) for i in range(24)]
    later[-6] += 10.0  # ...but a reading 10 above its hour's usual is, though within the range
    out = run(infer(make_ctx("b")), [_series(later)]).tail(24)
    assert out.filter(pl.col("alarm"))["ts"].to_list() == [out["ts"][-6]]


def test_robust_state_survives_a_restart_and_stays_bounded(
    make_ctx: Callable[[str], Context],
) -> None:
    import math

    values = [20.0 + 5 * math.sin(2 * math.pi * (i % 24) / 24) + _noise(i) for i in range(24 * 6)]
    values[100:110] = [v + 15 for v in values[100:110]]
    for i in range(120, len(values)):
        values[i] += 30.0  # a shift for good
    batches = [_series(values).slice(i, 16) for i in range(0, len(values), 16)]
    config = {"model": {"history": 40, "reset_after": 4}, "window_column": "window_values"}
    straight = run(infer(make_ctx("a"), **config), batches)

    first = infer(make_ctx("b"), **config)
    head = run(first, batches[:5])
    restored = restart_transform(first, make_ctx("b"))
    tail = run(restored, batches[5:])
    assert pl.concat([head, tail]).equals(straight)
    assert straight.tail(12)["prediction"].sum() == 0  # the shift was adopted
    assert restored._detector is not None
    for state in restored._detector.series.values():
        assert state.robust is not None
        assert len(state.robust.residuals) <= 40 and len(state.robust.long.ranked) <= 40


def test_device_incidents_are_on_for_robust_only() -> None:
    """robust folds a device's simultaneous events into one alarm; zscore/ewma keep their old
    behaviour (events are the runs of flagged readings of each series) unless asked."""
    def settings(**model: Any) -> Any:
        cfg = InferConfig.model_validate({"type": "infer", "model": model})
        return cfg.model.settings()  # type: ignore[union-attr]

    assert settings().incidents is True
    assert settings(method="zscore").incidents is False
    assert settings(method="ewma", incidents=True).incidents is True
    assert settings(incidents=False).incidents is False
