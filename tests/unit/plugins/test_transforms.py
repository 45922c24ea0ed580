"""filter, derive, sql and python transforms: results, empty frames, validation, pickling."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from collector.errors import ConfigError, TransformError
from collector.plugin import Context, Transform
from collector.schema import empty_readings
from collector.testing import ListSink, restart_transform, run_once
from collector.transforms.derive import DeriveConfig, DeriveTransform
from collector.transforms.filter import FilterConfig, FilterTransform
from collector.transforms.python import PythonTransform, PythonTransformConfig
from collector.transforms.sql import SqlConfig, SqlTransform

from .conftest import readings

HERE = str(Path(__file__).parent)


def sample() -> pl.DataFrame:
    return readings([(0, "a", "t", 21.5, "C"), (1, "a", "t", 99.0, "C"), (2, "b", "h", None, "%"),
                     (3, "b", "t", -50.0, "C")])


def roundtrip(t: Transform) -> Transform:
    return restart_transform(t)


def test_filter_keeps_matching_rows_and_treats_null_as_false(ctx: Context) -> None:
    t = FilterTransform(FilterConfig(type="filter", where="value BETWEEN -40 AND 85"), ctx)
    assert t.apply(sample())["value"].to_list() == [21.5]
    t2 = roundtrip(t)
    assert t2.apply(sample()).equals(t.apply(sample()))
    empty = t.apply(empty_readings())
    assert empty.is_empty() and empty.schema == empty_readings().schema
    with pytest.raises(Exception, match="nope"):
        FilterTransform(FilterConfig(type="filter", where="nope > 1"), ctx).apply(empty_readings())


def test_filter_rejects_bad_sql() -> None:
    with pytest.raises(ValidationError, match="invalid SQL expression"):
        FilterConfig(type="filter", where="value >>> 3 AND")


def test_derive_adds_and_chains_columns(ctx: Context) -> None:
    cfg = DeriveConfig(type="derive", columns={
        "f": "value * 9 / 5 + 32",
        "hot": "f > 100",
        "unit": "CASE WHEN metric = 't' THEN 'degC' ELSE unit END",
    })
    out = DeriveTransform(cfg, ctx).apply(sample())
    assert out["f"].to_list() == pytest.approx([70.7, 210.2, None, -58.0], nan_ok=True)
    assert out["hot"].to_list() == [False, True, None, False]
    assert out["unit"].to_list() == ["degC", "degC", "%", "degC"]
    empty = DeriveTransform(cfg, ctx).apply(empty_readings())
    assert empty.is_empty() and empty.schema["hot"] == pl.Boolean
    with pytest.raises(ValidationError, match="bad"):
        DeriveConfig(type="derive", columns={"bad": "1 +"})


def test_sql_over_the_batch(ctx: Context) -> None:
    cfg = SqlConfig(type="sql", query="SELECT device, metric, AVG(value) AS mean, COUNT(*) AS n "
                                      "FROM self WHERE value IS NOT NULL "
                                      "GROUP BY device, metric ORDER BY device, metric")
    out = SqlTransform(cfg, ctx).apply(sample())
    assert out.to_dicts() == [
        {"device": "a", "metric": "t", "mean": pytest.approx(60.25), "n": 2},
        {"device": "b", "metric": "t", "mean": -50.0, "n": 1},
    ]
    empty = SqlTransform(cfg, ctx).apply(empty_readings())
    assert empty.is_empty() and empty.columns == ["device", "metric", "mean", "n"]


def test_sql_validation() -> None:
    with pytest.raises(ValidationError, match="invalid SQL query"):
        SqlConfig(type="sql", query="SELEC * FROM self")
    with pytest.raises(ValidationError, match="other"):
        SqlConfig(type="sql", query="SELECT * FROM other")
    # Column names are checked later, against the real schema (chain check).
    SqlConfig(type="sql", query="SELECT value * 2 AS v FROM self")


def test_python_transform(ctx: Context) -> None:
    cfg = PythonTransformConfig(type="python", function="plugin_user_code:double", path=HERE,
                                args={"factor": 10})
    t = PythonTransform(cfg, ctx)
    assert PythonTransform.schema_opaque is True
    assert t.apply(sample())["value"].to_list() == [215.0, 990.0, None, -500.0]
    assert roundtrip(t).apply(sample())["value"].to_list() == [215.0, 990.0, None, -500.0]
    assert t.apply(empty_readings()).is_empty()
    bad = PythonTransform(PythonTransformConfig(
        type="python", function="plugin_user_code:not_a_frame", path=HERE), ctx)
    with pytest.raises(TransformError, match="not a Polars DataFrame"):
        bad.apply(sample())
    with pytest.raises(ConfigError, match="cannot import"):
        PythonTransform(PythonTransformConfig(type="python", function="nope_mod_q:f"), ctx)


def test_async_python_transform_works_like_a_sync_one(tmp_path: Path) -> None:
    """An `async def` transform used to pass check, then dead-letter every batch."""
    config = {
        "device": "d",
        "sources": [{"name": "s", "type": "simulated", "every": "1s", "seed": 1}],
        "transforms": [
            {"type": "python", "function": "plugin_user_code:double_async", "path": str(HERE),
             "args": {"factor": 0}},
        ],
        "sinks": [{"name": "out", "type": "collector.testing:ListSink"}],
    }
    ListSink.reset()
    assert run_once(config, tmp_path) == 0
    rows = ListSink.rows("out")
    assert rows.height > 0 and rows["value"].to_list() == [0.0] * rows.height
    assert not (tmp_path / "dead-letter").exists()
