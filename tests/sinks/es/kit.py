"""Test kit for the elasticsearch sink: tables of readings and a delivery loop that stands in for
the runtime's spool worker (retry what the sink says to retry, dead-letter what it rejects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa

from collector.errors import PartialWriteError, TransientSinkError
from collector.plugin import Sink
from collector.schema import READING_SCHEMA, RECORD_ID

START = datetime(2024, 1, 1, 23, 58, tzinfo=UTC)
"""Rows every 30 s from here cross midnight, so a batch spans two daily indices."""


def readings(
    n: int, batch_id: str = "b1", *, bad_mean: tuple[int, ...] = (), value_base: float = 20.0
) -> pa.Table:
    """``n`` canonical readings with ``record_id``; rows in ``bad_mean`` carry ``mean: "n/a"``
    (a string in a field the template maps as double, as a buggy python transform might emit)."""
    ts = [START + timedelta(seconds=30 * i) for i in range(n)]
    cols: dict[str, pa.Array] = {
        "ts": pa.array(ts, READING_SCHEMA.field("ts").type),
        "device": pa.array(["edge-01"] * n),
        "source": pa.array(["room"] * n),
        "metric": pa.array(["temperature" if i % 2 else "humidity" for i in range(n)]),
        "value": pa.array([value_base + i / 4 for i in range(n)], pa.float64()),
        "unit": pa.array(["C" if i % 2 else "%" for i in range(n)]),
    }
    if bad_mean:
        cols["mean"] = pa.array(["n/a" if i in bad_mean else None for i in range(n)], pa.string())
    cols[RECORD_ID] = pa.array([f"{batch_id}:{i}" for i in range(n)])
    return pa.table(cols)


def ids(table: pa.Table | None) -> list[str]:
    return [] if table is None else table.column(RECORD_ID).to_pylist()


@dataclass
class Delivery:
    """What the stand-in runtime saw while delivering one batch."""

    attempts: int = 0
    dead_letter: dict[str, str] = field(default_factory=dict)
    """record_id -> reason of every rejected row."""
    retried: list[list[str]] = field(default_factory=list)
    """record_ids handed back for retry, per attempt."""
    transient: list[TransientSinkError] = field(default_factory=list)


async def deliver(sink: Sink, table: pa.Table, batch_id: str, max_attempts: int = 8) -> Delivery:
    """Write until nothing is left to retry, the way the spool worker does (minus the backoff)."""
    out = Delivery()
    pending: pa.Table | None = table
    while pending is not None:
        out.attempts += 1
        assert out.attempts <= max_attempts, f"still retrying after {max_attempts} attempts"
        try:
            await sink.write(pending, batch_id)
            pending = None
        except TransientSinkError as exc:
            out.transient.append(exc)
        except PartialWriteError as exc:
            if exc.rejected_rows is not None:
                assert len(exc.reasons) == exc.rejected_rows.num_rows
                out.dead_letter.update(zip(ids(exc.rejected_rows), exc.reasons, strict=True))
            pending = exc.retry_rows
            out.retried.append(ids(pending))
    return out
