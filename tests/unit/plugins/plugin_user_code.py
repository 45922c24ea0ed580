"""User code the python source/transform tests import through `path:` (not a test module)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import polars as pl

CALLS: list[str] = []


def read_wide(base: float = 20.0) -> dict[str, float]:
    CALLS.append("read_wide")
    return {"temperature": base, "humidity": base * 2}


async def read_async(n: int = 2) -> list[dict[str, Any]]:
    return [{"metric": "m", "value": float(i)} for i in range(n)]


def read_frame() -> pl.DataFrame:
    return pl.DataFrame({"metric": ["a", "b"], "value": [1.0, 2.0]})


async def stream_async(n: int = 3) -> AsyncIterator[dict[str, float]]:
    for i in range(n):
        yield {"counter": float(i)}


def stream_sync(n: int = 3) -> Iterator[dict[str, float]]:
    for i in range(n):
        yield {"counter": float(i * 10)}


def double(df: pl.DataFrame, factor: float = 2.0) -> pl.DataFrame:
    return df.with_columns(pl.col("value") * factor)


async def double_async(df: pl.DataFrame, factor: float = 2.0) -> pl.DataFrame:
    return df.with_columns(pl.col("value") * factor)


def not_a_frame(df: pl.DataFrame) -> int:
    return 3
