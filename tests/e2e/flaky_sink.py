"""A real sink for failure-injection tests: Parquet files in a folder, down while a flag exists.

Used by the end-to-end tests as ``type: tests.e2e.flaky_sink:FlakySink``. Each batch lands as
``<path>/<batch id>.parquet`` (so a replayed batch overwrites, like the lake and S3), and the
order of successful writes is appended to ``<path>/ORDER``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from collector.errors import PermanentSinkError, TransientSinkError
from collector.plugin import Sink, SinkConfig
from collector.runtime.identity import order_key


class FlakyConfig(SinkConfig):
    path: Path = Field(description="Folder the batches land in.")
    down_flag: Path = Field(description="While this file exists, writes fail (transient).")
    reject_every: int | None = Field(
        default=None, description="Reject for good the batches whose first offset % N == 0."
    )


class FlakySink(Sink):
    """Written against the first sink contract (a pyarrow Table per batch), so every test that
    uses it also runs the runtime's ``arrow_batches`` path a third-party sink would take."""

    Config = FlakyConfig
    description = "Test sink: folder of Parquet batches, fails while a flag file exists."
    arrow_batches = True

    async def write(self, table: pa.Table, batch_id: str) -> None:
        cfg: FlakyConfig = self.config
        if cfg.down_flag.exists():
            raise TransientSinkError("sink is down (flag file present)")
        if cfg.reject_every and order_key(batch_id)[0] % cfg.reject_every == 0:
            raise PermanentSinkError(f"batch {batch_id} is not accepted")
        cfg.path.mkdir(parents=True, exist_ok=True)
        tmp = cfg.path / f".{batch_id}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, cfg.path / f"{batch_id}.parquet")
        with open(cfg.path / "ORDER", "a") as fh:
            fh.write(f"{self.ctx.component} {batch_id}\n")
