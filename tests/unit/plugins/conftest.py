"""Shared helpers for the plugin tests: contexts, canonical frames, async collection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collector.plugin import Context
from collector.schema import POLARS_SCHEMA

T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    return Context(device="d1", component="comp", data_dir=tmp_path)


def readings(rows: Iterable[Sequence[Any]]) -> pl.DataFrame:
    """Canonical frame from (seconds after T0, device, metric, value[, unit]) tuples."""
    out = []
    for r in rows:
        sec, device, metric, value = r[:4]
        unit = r[4] if len(r) > 4 else None
        out.append(
            {
                "ts": T0 + timedelta(seconds=sec),
                "device": device,
                "source": "s",
                "metric": metric,
                "value": value,
                "unit": unit,
            }
        )
    return pl.DataFrame(out, schema=POLARS_SCHEMA)


async def collect(gen: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in gen]
