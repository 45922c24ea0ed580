"""``conform`` hands an already canonical frame back as it is, and conforms every other one.

The pass-through must never change what comes out: each frame below is also run through the
full cast-and-check path (the pass-through switched off) and both results must be equal.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from collector import schema
from collector.schema import POLARS_SCHEMA, conform

NOW = datetime(2024, 1, 1, tzinfo=UTC)
KW: dict[str, Any] = {"device": "edge", "source": "logger", "now": NOW}


def canonical(n: int = 6, **columns: Any) -> pl.DataFrame:
    """A replay-like chunk: canonical schema, one null value (a missing reading)."""
    data: dict[str, Any] = {
        "ts": [NOW + timedelta(seconds=i) for i in range(n)],
        "device": [f"dev-{i % 2}" for i in range(n)],
        "source": ["logger"] * n,
        "metric": ["temperature", "humidity"] * (n // 2),
        "value": [None if i == 2 else i / 3 for i in range(n)],
        "unit": [None] * n,
    }
    data.update(columns)
    return pl.DataFrame(data, schema=POLARS_SCHEMA)


def full_path(df: pl.DataFrame, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> pl.DataFrame:
    with monkeypatch.context() as m:
        m.setattr(schema, "_canonical", lambda *_a, **_k: False)
        return conform(df, **kw)


@pytest.mark.parametrize(
    ("tags", "units"),
    [({}, None), ({"site": "plant-1"}, None), ({}, {"temperature": "C"})],
)
def test_a_canonical_frame_passes_through_unchanged(
    tags: dict[str, str], units: dict[str, str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    df = canonical()
    if tags:
        df = df.with_columns(pl.lit("plant-2").alias("site"))
    if units:
        df = df.with_columns(pl.lit("K").alias("unit"))
    out = conform(df, tags=tags, units=units, **KW)
    assert out is df
    assert out.equals(full_path(df, monkeypatch, tags=tags, units=units, **KW))
    empty = df.clear()
    assert conform(empty, tags=tags, units=units, **KW) is empty


NOT_CANONICAL = {
    "a null device is filled": canonical(device=["dev-0", None] * 3),
    "a null ts is rejected": canonical(ts=[NOW, None, NOW, NOW, NOW, NOW]),
    "an empty metric is rejected": canonical(metric=["t", "", "t", "t", "t", "t"]),
    "a NaN value becomes null": canonical(value=[1.0, float("nan"), 2.0, 3.0, 4.0, 5.0]),
    "an infinite value is rejected": canonical(value=[1.0, float("inf"), 2.0, 3.0, 4.0, 5.0]),
    "a -infinite value is rejected": canonical(value=[1.0, -float("inf"), 2.0, 3.0, 4.0, 5.0]),
    "a sum that overflows still conforms": canonical(value=[1e308] * 6),
    "an extra column is dropped": canonical().with_columns(pl.lit(1).alias("extra")),
    "columns out of order are reordered": canonical().select(
        "device", "ts", "source", "metric", "value", "unit"
    ),
    "a float32 value is cast": canonical().with_columns(pl.col("value").cast(pl.Float32)),
    "a millisecond ts is cast": canonical().with_columns(pl.col("ts").dt.cast_time_unit("ms")),
    "a naive ts is read as UTC": canonical().with_columns(pl.col("ts").dt.replace_time_zone(None)),
    "a missing unit column is added": canonical().drop("unit"),
}


@pytest.mark.parametrize("name", NOT_CANONICAL)
def test_a_frame_that_is_not_canonical_is_still_conformed(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    df = NOT_CANONICAL[name]
    rejected: list[str] = []
    kw = {**KW, "reject": lambda _raw, reason: rejected.append(reason)}
    out = conform(df, **kw)
    assert out is not df
    assert dict(out.schema) == POLARS_SCHEMA
    assert out.equals(full_path(df, monkeypatch, **kw))
    assert out["value"].is_nan().sum() == 0
    assert out["device"].null_count() == 0


def test_tags_and_units_that_would_fill_nulls_are_still_conformed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tagged = canonical().with_columns(pl.Series("site", ["a", None] * 3, pl.String))
    out = conform(tagged, tags={"site": "plant-1"}, **KW)
    assert out is not tagged
    assert out["site"].to_list() == ["a", "plant-1"] * 3
    assert out.equals(full_path(tagged, monkeypatch, tags={"site": "plant-1"}, **KW))

    missing_tag = canonical()
    out = conform(missing_tag, tags={"site": "plant-1"}, **KW)
    assert out["site"].to_list() == ["plant-1"] * 6

    units = {"temperature": "C"}
    out = conform(canonical(), units=units, **KW)
    assert out["unit"].to_list() == ["C", None] * 3
    assert out.equals(full_path(canonical(), monkeypatch, units=units, **KW))
