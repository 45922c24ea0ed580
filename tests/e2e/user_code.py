"""User functions for `python` sources in end-to-end tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl

BASE = datetime(2024, 5, 1, tzinfo=UTC)


def burst() -> list[dict]:
    """200 readings with values 0..199, one per second of event time."""
    return [{"ts": BASE + timedelta(seconds=i), "metric": "level", "value": float(i)}
            for i in range(200)]


def nothing() -> list[dict]:
    """No readings: a run that only delivers what is already spooled."""
    return []


def poison() -> list[dict]:
    """One reading the `refuse_negative` transform cannot handle."""
    return [{"ts": BASE, "metric": "level", "value": -1.0}]


def refuse_negative(df: pl.DataFrame) -> pl.DataFrame:
    """A user transform with a bug for negative values."""
    if (df["value"] < 0).any():
        raise ValueError("negative level: sensor wiring?")
    return df


def values_as_text(df: pl.DataFrame) -> pl.DataFrame:
    """A user transform that turns `value` into text, so a numeric `where:` cannot run on it."""
    return df.with_columns(pl.col("value").cast(pl.String))


def with_pool_size(df: pl.DataFrame) -> pl.DataFrame:
    """Tags each reading with the size of the Polars thread pool it was processed with."""
    return df.with_columns(pl.lit(pl.thread_pool_size()).alias("pool"))
