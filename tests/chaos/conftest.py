"""Chaos tests run the real CLI; they share the process helpers of the end-to-end tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from tests.e2e.conftest import collectors  # noqa: F401 - a fixture

T0 = datetime(2024, 2, 1, tzinfo=UTC)


def write_csv(
    path: Path, n: int, *, start: datetime = T0, step: float = 1.0, first: int = 0
) -> Path:
    """``n`` narrow rows, one metric, value = row number (``first`` on): each row is known."""
    ts = [(start + timedelta(seconds=step * i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for i in range(n)]
    pl.DataFrame(
        {
            "ts": ts,
            "metric": ["flow"] * n,
            "value": [float(first + i) for i in range(n)],
        }
    ).write_csv(path)
    return path
