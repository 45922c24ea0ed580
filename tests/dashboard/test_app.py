"""The Streamlit page under ``AppTest``: filters change what is shown; charts get the right rows."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from polars.testing import assert_frame_equal
from streamlit.testing.v1 import AppTest

from dashboards import data
from sample_data.make_lake import aggregate_table, write_lake

APP = str(Path(__file__).resolve().parents[2] / "dashboards" / "app.py")
LAST = datetime(2024, 6, 3, 23, 59, tzinfo=UTC)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, sample_lake: Path, tmp_path: Path) -> Path:
    monkeypatch.setenv(data.LAKE_ENV, str(sample_lake))
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.delenv(data.THRESHOLDS_ENV, raising=False)
    return tmp_path / "data"


def run(at: AppTest | None = None) -> AppTest:
    at = (at or AppTest.from_file(APP, default_timeout=120)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at: AppTest) -> dict[str, pl.DataFrame]:
    """Rows each time-series chart received, by its y-axis title (``metric (unit)``)."""
    out: dict[str, pl.DataFrame] = {}
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        if "layer" not in spec:
            continue  # a histogram
        title = spec["layer"][1]["encoding"]["y"]["title"]
        tables = [ipc.open_stream(d.data.data).read_all() for d in chart.proto.datasets]
        frame = pl.from_arrow(pa.concat_tables(tables))
        assert isinstance(frame, pl.DataFrame)
        out[title] = frame
    return out


def health(at: AppTest) -> Any:
    """The collector health table as shown (a pandas frame indexed by sink)."""
    tables = [t.value for t in at.table if "last error" in t.value.columns]
    assert len(tables) == 1
    return tables[0]


def lake_rows(lake: Path) -> pl.DataFrame:
    """The lake read directly, without the code under test."""
    return pl.read_parquet(lake / "**" / "*.parquet", hive_partitioning=False)


def test_default_page_shows_last_day_of_every_metric(env: Path, sample_lake: Path) -> None:
    at = run()
    assert [h.value for h in at.subheader][:3] == ["humidity", "pressure", "temperature"]
    assert len(at.metric) == 9  # 3 devices x 3 metrics
    shown = charts(at)
    assert set(shown) == {"humidity (%)", "pressure (hPa)", "temperature (C)"}
    want = (
        lake_rows(sample_lake)
        .filter((pl.col("metric") == "temperature") & (pl.col("ts") > LAST - timedelta(days=1)))
        .select("ts", "device", "mean", "min", "max", "count")
        .sort("device", "ts")
    )
    got = shown["temperature (C)"].sort("device", "ts")
    assert got.height == want.height == 3 * 1440  # 1-minute rows are already coarse enough
    assert_frame_equal(got, want, rel_tol=1e-12)  # mean is sum(mean * count) / sum(count)
    tile = next(m for m in at.metric if m.label == "edge-01" and m.value.endswith(" C"))
    last = want.filter(pl.col("device") == "edge-01").tail(2)["mean"].to_list()
    assert tile.value == f"{last[1]:,.2f} C"
    assert tile.delta == f"{last[1] - last[0]:+.2f}"
    assert "resolution 1m" in at.caption[0].value
    assert any("status.json" in i.value for i in at.info)  # no collector ran here


def test_device_and_metric_filters_change_what_is_shown(env: Path) -> None:
    at = run()
    at.multiselect(key="filter_device").set_value(["edge-01"])
    at.multiselect(key="filter_metric").set_value(["temperature"])
    run(at)
    assert next(h.value for h in at.subheader) == "temperature"
    assert "humidity" not in [h.value for h in at.subheader]
    assert [m.label for m in at.metric] == ["edge-01"]
    shown = charts(at)
    assert list(shown) == ["temperature (C)"]
    assert shown["temperature (C)"]["device"].unique().to_list() == ["edge-01"]
    assert shown["temperature (C)"].height == 1440


def test_all_time_range_downsamples_automatically(env: Path, sample_lake: Path) -> None:
    at = run()
    at.selectbox(key="preset").set_value("All")
    at.multiselect(key="filter_metric").set_value(["humidity"])
    run(at)
    assert "resolution 5m" in at.caption[0].value
    got = charts(at)["humidity (%)"]
    per_device = dict(got.group_by("device").len().iter_rows())
    # 3 days of 5-minute buckets; edge-03 was down for 2 hours (24 buckets)
    assert per_device == {"edge-01": 864, "edge-02": 864, "edge-03": 840}
    lake = lake_rows(sample_lake).filter(pl.col("metric") == "humidity")
    assert got["count"].sum() == lake["count"].sum()
    assert got["max"].max() == lake["max"].max() and got["min"].min() == lake["min"].min()


def test_threshold_from_the_sidebar_fills_the_table(env: Path, sample_lake: Path) -> None:
    at = run()
    at.selectbox(key="preset").set_value("All")
    at.number_input(key="th_high_temperature").set_value(30.0)
    run(at)
    want = lake_rows(sample_lake).filter((pl.col("metric") == "temperature") & (pl.col("max") > 30))
    tables = [d for d in at.dataframe if "peak" in d.value.columns]
    assert len(tables) == 1
    table = tables[0].value
    assert len(table) == want.height > 0
    assert sorted(table["peak"].tolist()) == sorted(want["max"].to_list())
    assert any(f"({want.height})" in m.value for m in at.markdown)


def test_thresholds_file_sets_the_defaults(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "thresholds.yaml"
    path.write_text("humidity: {low: 40}\n")
    monkeypatch.setenv(data.THRESHOLDS_ENV, str(path))
    at = run()
    assert at.number_input(key="th_low_humidity").value == 40
    tables = [d.value for d in at.dataframe if "peak" in d.value.columns]
    assert len(tables) == 1 and set(tables[0]["kind"]) == {"below"}


def _spool(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as f, ipc.new_stream(f, table.schema) as w:
        w.write_table(table)


def test_spool_source_and_collector_health(env: Path) -> None:
    recent = aggregate_table(
        start=datetime(2024, 7, 1, tzinfo=UTC), days=1, devices=("pi-7",), gap=None
    ).slice(0, 90)  # 90 minutes of temperature
    recent = recent.append_column("record_id", pa.array([f"b:{i}" for i in range(90)]))
    _spool(env / "spool" / "cloud" / "b-0001.arrow", recent)
    (env / "status.json").write_text(
        json.dumps(
            {
                "pid": 0,
                "running": False,
                "updated_at": 1719792000.0,
                "sinks": {
                    "cloud": {
                        "delivered_rows": 5,
                        "dropped_rows": {"spool_full": 3},
                        "dead_lettered_rows": 1,
                        "last_error": "ServiceUnavailable",
                    }
                },
            }
        )
    )
    at = run()
    status = health(at)
    row = status.loc["cloud"]
    assert row["dropped"] == "3 (spool_full: 3)" and row["dead letters"].startswith("1 rows")
    assert "1 files" in row["backlog"] and row["last error"] == "ServiceUnavailable"

    at.radio(key="source_kind").set_value("Spool (not yet uploaded)")
    run(at)
    assert at.selectbox(key="spool_sink").value == "cloud"
    shown = charts(at)
    metric = recent.column("metric")[0].as_py()
    unit = recent.column("unit")[0].as_py()
    got = shown[f"{metric} ({unit})"]
    assert got["device"].unique().to_list() == ["pi-7"]
    assert got.height == 90
    assert [m.label for m in at.metric] == ["pi-7"]


def test_new_batches_invalidate_the_cache(
    env: Path, sample_lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = tmp_path / "lake"
    write_lake(aggregate_table(days=1, gap=None), lake)
    monkeypatch.setenv(data.LAKE_ENV, str(lake))
    at = run()
    before = charts(at)["pressure (hPa)"]["ts"].max()
    write_lake(
        aggregate_table(start=datetime(2024, 6, 2, tzinfo=UTC), days=1, gap=None),
        lake,
        prefix="later",
    )
    at.toggle(key="autorefresh").set_value(True)
    run(at)
    after = charts(at)["pressure (hPa)"]["ts"].max()
    assert before == datetime(2024, 6, 1, 23, 59, tzinfo=UTC)
    assert after == datetime(2024, 6, 2, 23, 59, tzinfo=UTC)


def test_missing_lake_is_a_friendly_warning(
    env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(data.LAKE_ENV, str(tmp_path / "no-such-lake"))
    at = run()
    assert any("no-such-lake" in w.value for w in at.warning)


def test_custom_time_range(env: Path) -> None:
    at = run()
    at.selectbox(key="preset").set_value("Custom")
    run(at)
    at.date_input(key="custom_dates").set_value((date(2024, 6, 2), date(2024, 6, 2)))
    at.multiselect(key="filter_metric").set_value(["pressure"])
    run(at)
    got = charts(at)["pressure (hPa)"]
    assert got["ts"].min() == datetime(2024, 6, 2, tzinfo=UTC)
    assert got["ts"].max() == datetime(2024, 6, 2, 23, 59, tzinfo=UTC)
    # edge-03 was down from 10:00 to 12:00 that day
    assert dict(got.group_by("device").len().iter_rows()) == {
        "edge-01": 1440,
        "edge-02": 1440,
        "edge-03": 1320,
    }
    fresh = next(d.value for d in at.dataframe if "gaps" in d.value.columns)
    assert fresh.set_index("device")["gaps"].to_dict() == {"edge-01": 0, "edge-02": 0, "edge-03": 1}


def test_row_filter_and_its_errors(env: Path, sample_lake: Path) -> None:
    at = run()
    at.selectbox(key="preset").set_value("All")
    at.text_input(key="where").set_value("max - min > 3.5")
    at.multiselect(key="filter_metric").set_value(["temperature"])
    run(at)
    got = charts(at)["temperature (C)"]
    want = lake_rows(sample_lake).filter(
        (pl.col("metric") == "temperature") & (pl.col("max") - pl.col("min") > 3.5)
    )
    assert got["count"].sum() == want["count"].sum() > 0
    at.text_input(key="where").set_value("max >")
    run(at)
    assert any("invalid SQL" in e.value for e in at.sidebar.error)
    at.text_input(key="where").set_value("value > 3")  # an aggregate lake has no `value`
    run(at)
    assert any("query failed" in e.value for e in at.error)


# ---------------------------------------------------------------------------------------------
# issue 17 item 13


def test_freshness_age_is_against_now(env: Path) -> None:
    before = datetime.now(UTC)
    at = run()
    fresh = next(d.value for d in at.dataframe if "age_min" in d.value.columns)
    least = (before - LAST).total_seconds() / 60  # the sample lake ends at LAST
    assert (fresh["age_min"] >= math.floor(least)).all(), fresh["age_min"].tolist()
    assert any("(now)" in c.value for c in at.caption)


def test_a_lake_from_the_url_shows_its_own_collector_health(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (env / "lake").mkdir(parents=True)
    write_lake(aggregate_table(days=1, gap=None), env / "lake")
    (env / "status.json").write_text(
        json.dumps({"pid": 0, "updated_at": 1719792000.0,
                    "sinks": {"started-sink": {"delivered_rows": 5}}})
    )
    monkeypatch.setenv(data.LAKE_ENV, str(env / "lake"))
    at = run()
    assert list(health(at).index) == ["started-sink"]  # the started-with lake: its collector
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["lake"] = str(data.SAMPLE_LAKE)
    at.run()
    assert not at.exception
    assert str(data.SAMPLE_LAKE) in at.caption[0].value
    assert not [t for t in at.table if "last error" in t.value.columns]  # not ./data's health
    assert any("No collector data dir goes with this lake" in i.value for i in at.info)
    assert at.text_input(key="data_dir").value == ""


def test_resolution_shown_is_the_data_own_for_a_short_range(env: Path) -> None:
    at = run()
    at.selectbox(key="preset").set_value("Last hour")
    run(at)
    assert "resolution 1m" in at.caption[0].value  # 1-minute data, not "1s"/"2s" buckets
    assert charts(at)["pressure (hPa)"].height == 3 * 60


@pytest.mark.parametrize("preset", ["Last hour", "Last 24 hours", "All"])
def test_time_axis_labels_do_not_repeat(env: Path, preset: str) -> None:
    at = run()
    at.selectbox(key="preset").set_value(preset)
    run(at)
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        if "layer" not in spec:
            continue
        axis = spec["layer"][0]["encoding"]["x"]["axis"]
        ticks = [datetime.fromisoformat(v) for v in axis["values"]]
        labels = [t.strftime(axis["format"]) for t in ticks]
        assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
        shown = charts(at)
        first = min(f["ts"].min() for f in shown.values())
        assert all(first <= t <= LAST for t in ticks)
