"""User models in the `infer` transform: scikit-learn, ONNX, Python; hot swap; bad files."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collector.errors import ConfigError
from collector.models.features import feature_frame, feature_names
from collector.plugin import Context
from collector.testing import FakeClock, checkpoint_bytes, restart_transform
from collector.transforms.infer import (
    FeaturesConfig,
    InferConfig,
    InferTransform,
    validate_model_file,
)

from .conftest import labelled_readings

FEATURES = {"metrics": ["temperature"], "lags": [1], "rolling": [10]}
CANONICAL = ["ts", "device", "source", "metric", "value", "unit"]


def config(**overrides: Any) -> InferConfig:
    return InferConfig.model_validate({"type": "infer", "features": FEATURES, **overrides})


def train_forest(path: Path, seed: int = 1) -> Any:
    """A small classifier trained on features built by the same code the transform uses."""
    import joblib
    from sklearn.ensemble import RandomForestClassifier

    spec = FeaturesConfig.model_validate(FEATURES)
    names = feature_names(spec)
    train = feature_frame(labelled_readings(seed, 3000), spec).drop_nulls(names)
    model = RandomForestClassifier(n_estimators=30, max_depth=6, random_state=0)
    model.fit(train.select(names).to_numpy(), train["label"].to_numpy())
    joblib.dump(model, path)
    return model


def in_batches(df: pl.DataFrame, size: int) -> list[pl.DataFrame]:
    return [df.slice(i, size) for i in range(0, df.height, size)]


def run(t: InferTransform, df: pl.DataFrame, size: int = 37) -> pl.DataFrame:
    return pl.concat([t.apply(b) for b in in_batches(df, size)])


def test_sklearn_model_flags_anomalies_and_is_unsure_at_the_border(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    model = train_forest(tmp_path / "forest.joblib")
    stream = labelled_readings(seed=2, per_device=1500)
    t = InferTransform(config(model={"kind": "sklearn", "path": str(tmp_path / "forest.joblib")}),
                       make_ctx("infer"))
    t.open()
    out = run(t, stream.select(CANONICAL))
    assert out.select(CANONICAL).equals(stream.select(CANONICAL))  # order and rows kept

    labelled = out.with_columns(stream.select("magnitude", "label"))
    clear = labelled.filter(pl.col("magnitude") >= 6)
    assert clear.height >= 20
    assert (clear["prediction"] == 1.0).mean() >= 0.9
    quiet = labelled.filter(pl.col("magnitude") == 0)
    assert (quiet["prediction"] == 1.0).mean() <= 0.01
    unsure = labelled.filter(pl.col("prediction").is_not_null() & (pl.col("confidence") < 0.6))
    assert unsure.height > 0
    assert unsure["magnitude"].mean() > quiet["magnitude"].mean()  # doubt sits at the border

    # Streaming features in micro-batches == features over the whole history, row for row.
    names = feature_names(t.config.features)
    offline = feature_frame(stream, t.config.features)
    complete = offline.drop_nulls(names)
    expected = model.predict_proba(complete.select(names).to_numpy()).max(axis=1)
    got = out.filter(offline.select(pl.all_horizontal(pl.col(names).is_not_null())).to_series())
    assert got["confidence"].to_list() == pytest.approx(list(expected))
    # The first reading of each series has no lag: unscored, confidence 0, never dropped.
    first = out.group_by("device").head(1)
    assert first["prediction"].null_count() == 2 and (first["confidence"] == 0).all()


def test_onnx_export_gives_the_same_verdicts(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    from skl2onnx import to_onnx

    model = train_forest(tmp_path / "forest.joblib")
    spec = FeaturesConfig.model_validate(FEATURES)
    names = feature_names(spec)
    sample = feature_frame(labelled_readings(3, 50), spec).drop_nulls(names)
    onx = to_onnx(model, sample.select(names).to_numpy().astype("float32"),
                  options={id(model): {"zipmap": False}})
    (tmp_path / "forest.onnx").write_bytes(onx.SerializeToString())

    stream = labelled_readings(seed=4, per_device=800).select(CANONICAL)
    by_sklearn = run(InferTransform(
        config(model={"kind": "sklearn", "path": str(tmp_path / "forest.joblib")}),
        make_ctx("a")), stream)
    by_onnx = run(InferTransform(
        config(model={"kind": "onnx", "path": str(tmp_path / "forest.onnx")}),
        make_ctx("b")), stream)
    agree = (by_onnx["prediction"] == by_sklearn["prediction"]).fill_null(True)
    assert agree.mean() >= 0.995  # float32 vs float64 may flip a row sitting on a split
    assert by_onnx["prediction"].null_count() == by_sklearn["prediction"].null_count()
    diff = (by_onnx["confidence"] - by_sklearn["confidence"]).abs()
    assert (diff.fill_null(0) < 0.05).mean() >= 0.995
    assert by_onnx.filter(pl.col("prediction") == 1.0).height > 10


def test_python_model_and_score_column(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    (tmp_path / "infer_test_rules.py").write_text(
        "import polars as pl\n"
        "def judge(features: pl.DataFrame):\n"
        "    dev = (features['value'] - features['mean_10']).abs() / features['std_10']\n"
        "    return {'prediction': (dev > 4).cast(pl.Float64), 'score': dev,\n"
        "            'confidence': (dev - 4).abs().clip(0, 1)}\n"
    )
    t = InferTransform(
        config(model={"kind": "python", "function": "infer_test_rules:judge",
                      "path": str(tmp_path)}),
        make_ctx("infer"),
    )
    t.open()
    stream = labelled_readings(seed=5, per_device=400)
    out = run(t, stream.select(CANONICAL)).with_columns(stream["magnitude"])
    scored = out.filter(pl.col("prediction").is_not_null())
    assert scored.height == out.height - 2 * 10  # 10 readings of history per device
    flagged = scored.filter(pl.col("prediction") == 1.0)
    assert flagged.height > 0 and (flagged["score"] > 4).all()
    assert (flagged["magnitude"] > 0).mean() >= 0.75
    f = feature_frame(stream, t.config.features)
    expected = ((f["value"] - f["mean_10"]).abs() / f["std_10"]).to_list()
    assert out["score"].to_list() == pytest.approx(expected, nan_ok=True)


def test_pivot_scores_one_row_per_device_and_time(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    (tmp_path / "infer_test_hvac.py").write_text(
        "def dew_risk(f):\n"
        "    return (f['humidity'] > 80) & (f['temperature'] < 10)\n"
    )
    rows = []
    import datetime as dt

    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for i, (temp, hum) in enumerate([(5.0, 90.0), (20.0, 90.0), (5.0, None), (4.0, 85.0)]):
        ts = t0 + dt.timedelta(seconds=i)
        rows.append({"ts": ts, "device": "d1", "source": "s", "metric": "temperature",
                     "value": temp, "unit": "C"})
        if hum is not None:
            rows.append({"ts": ts, "device": "d1", "source": "s", "metric": "humidity",
                         "value": hum, "unit": "%"})
        rows.append({"ts": ts, "device": "d1", "source": "s", "metric": "pressure",
                     "value": 1000.0, "unit": "hPa"})
    df = pl.DataFrame(rows).cast({"ts": pl.Datetime("us", "UTC")})
    cfg = InferConfig.model_validate({
        "type": "infer",
        "model": {"kind": "python", "function": "infer_test_hvac:dew_risk", "path": str(tmp_path)},
        "features": {"pivot": ["temperature", "humidity"]},
        "window_column": "window_values",
    })
    out = InferTransform(cfg, make_ctx("infer")).apply(df)
    got = {(r["ts"].second, r["metric"]): (r["prediction"], r["confidence"], r["window_values"])
           for r in out.to_dicts()}
    assert got[(0, "temperature")] == (1.0, None, [5.0, 90.0])
    assert got[(0, "humidity")] == (1.0, None, [5.0, 90.0])
    assert got[(1, "humidity")][0] == 0.0
    assert got[(2, "temperature")] == (None, 0.0, [5.0, None])  # unscored, unsure
    assert got[(3, "humidity")][0] == 1.0
    assert got[(0, "pressure")] == (None, None, None)  # not a model input


def test_bad_model_file_is_a_clear_error_at_start(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    bad = tmp_path / "model.joblib"
    bad.write_bytes(b"this is not a pickle")
    cfg = config(model={"kind": "sklearn", "path": str(bad)})
    t = InferTransform(cfg, make_ctx("scorer"))  # constructing reads nothing
    with pytest.raises(ConfigError) as err:
        t.open()
    message = str(err.value)
    assert "scorer" in message and str(bad) in message and "not a joblib/pickle model" in message
    assert "not a joblib/pickle model" in (validate_model_file(cfg) or "")

    missing = config(model={"kind": "onnx", "path": str(tmp_path / "nope.onnx")})
    assert "does not exist" in (validate_model_file(missing) or "")

    train_forest(tmp_path / "forest.joblib")  # trained on 4 features
    narrower = InferConfig.model_validate({
        "type": "infer", "model": {"kind": "sklearn", "path": str(tmp_path / "forest.joblib")},
        "features": {"lags": [1, 2]},
    })
    reason = validate_model_file(narrower) or ""
    assert "trained on 4 features" in reason and "lag_2" in reason
    assert validate_model_file(config(model={"kind": "sklearn",
                                             "path": str(tmp_path / "forest.joblib")})) is None


def _python_model(folder: Path, name: str, body: str) -> None:
    path = folder / f"{name}.py"
    path.write_text(body)
    os.utime(path, ns=(path.stat().st_mtime_ns + 2_000_000_000,) * 2)


def test_hot_swap_and_a_bad_new_file_keeps_the_old_model(
    tmp_path: Path, make_ctx: Callable[[str], Context], clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import joblib
    from sklearn.dummy import DummyClassifier

    path = tmp_path / "model.joblib"
    always = [DummyClassifier(strategy="constant", constant=c) for c in (0, 1)]
    x = [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    for model in always:
        model.fit(x, [0, 1])
    joblib.dump(always[0], path)

    ctx = make_ctx("scorer")
    t = InferTransform(config(model={"kind": "sklearn", "path": str(path)},
                              reload_every="30s"), ctx)
    t.open()
    stream = labelled_readings(seed=6, per_device=300).select(CANONICAL)
    batches = in_batches(stream, 50)

    def predictions(batch: pl.DataFrame) -> set[float]:
        return set(t.apply(batch)["prediction"].drop_nulls().to_list())

    assert predictions(batches[0]) == {0.0}
    joblib.dump(always[1], path)
    os.utime(path, ns=(path.stat().st_mtime_ns + 1_000_000_000,) * 2)
    assert predictions(batches[1]) == {0.0}  # not checked yet: 30 s have not passed
    clock.advance(31)
    assert predictions(batches[2]) == {1.0}
    assert ctx.counters.get("model_reloads_total", component="scorer") == 1

    path.write_bytes(b"half-written garbage")
    clock.advance(31)
    with caplog.at_level(logging.WARNING, logger="collector"):
        assert predictions(batches[3]) == {1.0}  # still the last good model, no crash
    assert ctx.counters.get("model_reload_failures_total", component="scorer") == 1
    assert "keeping the previous one" in caplog.text and "not a joblib/pickle" in caplog.text
    clock.advance(31)
    assert predictions(batches[4]) == {1.0}
    assert ctx.counters.get("model_reload_failures_total", component="scorer") == 1  # once

    joblib.dump(always[0], path)
    os.utime(path, ns=(path.stat().st_mtime_ns + 3_000_000_000,) * 2)
    clock.advance(31)
    assert predictions(batches[5]) == {0.0}
    assert ctx.counters.get("model_reloads_total", component="scorer") == 2


def test_python_model_hot_swap(tmp_path: Path, make_ctx: Callable[[str], Context],
                               clock: FakeClock) -> None:
    _python_model(tmp_path, "infer_test_swap", "def f(x):\n    return [0.0] * x.height\n")
    t = InferTransform(InferConfig.model_validate({
        "type": "infer", "model": {"kind": "python", "function": "infer_test_swap:f",
                                   "path": str(tmp_path)}, "reload_every": 0,
    }), make_ctx("infer"))
    stream = labelled_readings(seed=7, per_device=20).select(CANONICAL)
    assert set(t.apply(stream)["prediction"]) == {0.0}
    _python_model(tmp_path, "infer_test_swap", "def f(x):\n    return [1.0] * x.height  # v2\n")
    assert set(t.apply(stream)["prediction"]) == {1.0}


def test_checkpoint_drops_the_model_and_reloads_it(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    train_forest(tmp_path / "forest.joblib")
    cfg = config(model={"kind": "sklearn", "path": str(tmp_path / "forest.joblib")})
    stream = labelled_readings(seed=8, per_device=400).select(CANONICAL)
    batches = in_batches(stream, 40)
    straight = pl.concat([InferTransform(cfg, make_ctx("a")).apply(b) for b in [stream]])

    t = InferTransform(cfg, make_ctx("b"))
    t.open()
    head = [t.apply(b) for b in batches[:5]]
    assert b"RandomForest" not in checkpoint_bytes(t)  # the model is not state
    restored = restart_transform(t, make_ctx("b"))
    tail = [restored.apply(b) for b in batches[5:]]
    assert pl.concat(head + tail).equals(straight)  # lag/rolling history survived


def test_string_labels_need_prediction_type_string(
    tmp_path: Path, make_ctx: Callable[[str], Context]
) -> None:
    import joblib
    from sklearn.tree import DecisionTreeClassifier

    model = DecisionTreeClassifier(random_state=0).fit([[0.0], [10.0]], ["ok", "hot"])
    joblib.dump(model, tmp_path / "labels.joblib")
    base = {"type": "infer", "model": {"kind": "sklearn", "path": str(tmp_path / "labels.joblib")}}
    with pytest.raises(ConfigError, match="prediction_type: string"):
        InferTransform(InferConfig.model_validate(base), make_ctx("infer")).open()
    t = InferTransform(InferConfig.model_validate({**base, "prediction_type": "string"}),
                       make_ctx("infer"))
    t.open()
    out = t.apply(labelled_readings(seed=9, per_device=5).select(CANONICAL).with_columns(
        pl.Series("value", [1.0, 2.0, 12.0, 3.0, 11.0, 0.0, 1.0, 2.0, 3.0, 4.0])))
    assert out["prediction"].to_list()[:5] == ["ok", "ok", "hot", "ok", "hot"]
    assert out["confidence"].to_list()[:5] == [1.0] * 5


def test_chained_infers_keep_each_others_verdicts(make_ctx: Callable[[str], Context]) -> None:
    from .conftest import simulated_batches

    batches = simulated_batches({
        "seed": 3, "metrics": {"temperature": {"kind": "uniform"},
                               "pressure": {"kind": "walk", "start": 1000, "step": 0.5}},
        "anomalies": {"rate": 0.02, "magnitude": 8}, "label_anomalies": True,
    }, ticks=600, per_batch=30)
    first = InferTransform(InferConfig.model_validate(
        {"type": "infer", "features": {"metrics": ["temperature"]}}), make_ctx("t"))
    second = InferTransform(InferConfig.model_validate(
        {"type": "infer", "model": {"method": "ewma", "alpha": 0.5},
         "features": {"metrics": ["pressure"]}}), make_ctx("p"))
    out = pl.concat([second.apply(first.apply(b)) for b in batches])
    for metric in ("temperature", "pressure"):
        rows = out.filter(pl.col("metric") == metric)
        assert rows["prediction"].null_count() == 30  # warm-up only
        hits = rows.filter(pl.col("anomaly") == "1")["prediction"].fill_null(0.0)
        assert hits.mean() >= 0.8


def test_a_model_error_leaves_the_batch_unscored_not_the_collector_down(
    tmp_path: Path, make_ctx: Callable[[str], Context], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "infer_test_fragile.py").write_text(
        "def judge(f):\n"
        "    if (f['value'] > 1000).any():\n"
        "        raise ValueError('sensor value out of the training range')\n"
        "    return [0.0] * f.height\n"
    )
    ctx = make_ctx("scorer")
    t = InferTransform(InferConfig.model_validate({
        "type": "infer", "model": {"kind": "python", "function": "infer_test_fragile:judge",
                                   "path": str(tmp_path)},
    }), ctx)
    t.open()
    stream = labelled_readings(seed=10, per_device=30).select(CANONICAL)
    good = stream.slice(0, 20)
    bad = stream.slice(20, 20).with_columns(pl.lit(5000.0).alias("value"))
    with caplog.at_level(logging.WARNING, logger="collector"):
        failed = [t.apply(bad), t.apply(bad)]
    for out in failed:
        assert out["prediction"].null_count() == out.height
        assert (out["confidence"] == 0.0).all()  # routes with the doubtful rows
        assert out.select(CANONICAL).equals(bad)  # nothing lost
    assert ctx.counters.get("model_errors_total", component="scorer") == 2
    assert caplog.text.count("out of the training range") == 1  # logged once, counted twice
    assert t.apply(good)["prediction"].to_list() == [0.0] * 20
