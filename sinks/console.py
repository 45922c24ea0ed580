"""NDJSON on stdout: one JSON object per row, for demos and `| jq` debugging."""

from __future__ import annotations

import asyncio
import sys
from typing import Literal

import polars as pl
from pydantic import Field

from collector.plugin import Sink, SinkConfig
from collector.schema import RECORD_ID

_ISO_NAIVE = "%Y-%m-%dT%H:%M:%S%.f"


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class ConsoleConfig(SinkConfig):
    """Config of the `console` sink."""

    type: Literal["console"] = Field(default="console", description="Plugin name.")
    record_id: bool = Field(
        default=False, description="Include the `record_id` column in the output."
    )


class ConsoleSink(Sink):
    """Prints every row as one JSON line with ISO 8601 timestamps, flushed per batch."""

    Config = ConsoleConfig
    description = "Print rows as NDJSON (one JSON object per line) on stdout."
    example = """\
- name: screen
  type: console
  where: "metric = 'temperature'"
"""
    requires = {}

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        df = frame
        if not self.config.record_id and RECORD_ID in df.columns:
            df = df.drop(RECORD_ID)
        if df.is_empty():
            return
        # Aware datetimes already serialise as ISO 8601 with offset; naive ones need the `T`.
        # NaN and infinities become null (JSON has no NaN).
        naive = [n for n, t in df.schema.items() if isinstance(t, pl.Datetime) and not t.time_zone]
        if naive:
            df = df.with_columns(pl.col(naive).dt.strftime(_ISO_NAIVE))
        text = df.write_ndjson()
        # A slow reader on the pipe must block a worker thread, not the event loop.
        await asyncio.to_thread(_emit, text if text.endswith("\n") else text + "\n")
