"""Test kit for the elasticsearch sink: frames of readings and a delivery loop that stands in for
the runtime's spool worker (retry what the sink says to retry, dead-letter what it rejects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl

from collector.errors import PartialWriteError, TransientSinkError
from collector.plugin import Sink
from collector.schema import POLARS_SCHEMA, RECORD_ID

START = datetime(2024, 1, 1, 23, 58, tzinfo=UTC)
"""Rows every 30 s from here cross midnight, so a batch spans two daily indices."""


def readings(
    n: int, batch_id: str = "b1", *, bad_mean: tuple[int, ...] = (), value_base: float = 20.0
) -> pl.DataFrame:
    """``n`` canonical readings with ``record_id``; rows in ``bad_mean`` carry ``mean: "n/a"``
    (a string in a field the template maps as double, as a buggy python transform might emit)."""
    ts = [START + timedelta(seconds=30 * i) for i in range(n)]
    cols: dict[str, pl.Series] = {
        "ts": pl.Series(ts, dtype=POLARS_SCHEMA["ts"]),
        "device": pl.Series(["edge-01"] * n, dtype=pl.String),
        "source": pl.Series(["room"] * n, dtype=pl.String),
        "metric": pl.Series(
            ["temperature" if i % 2 else "humidity" for i in range(n)], dtype=pl.String
        ),
        "value": pl.Series([value_base + i / 4 for i in range(n)], dtype=pl.Float64),
        "unit": pl.Series(["C" if i % 2 else "%" for i in range(n)], dtype=pl.String),
    }
    if bad_mean:
        cols["mean"] = pl.Series(
            ["n/a" if i in bad_mean else None for i in range(n)], dtype=pl.String
        )
    cols[RECORD_ID] = pl.Series([f"{batch_id}:{i}" for i in range(n)], dtype=pl.String)
    return pl.DataFrame(cols)


def ids(frame: pl.DataFrame | None) -> list[str]:
    return [] if frame is None else frame.get_column(RECORD_ID).to_list()


@dataclass
class Delivery:
    """What the stand-in runtime saw while delivering one batch."""

    attempts: int = 0
    dead_letter: dict[str, str] = field(default_factory=dict)
    """record_id -> reason of every rejected row."""
    retried: list[list[str]] = field(default_factory=list)
    """record_ids handed back for retry, per attempt."""
    transient: list[TransientSinkError] = field(default_factory=list)


async def deliver(
    sink: Sink, frame: pl.DataFrame, batch_id: str, max_attempts: int = 8
) -> Delivery:
    """Write until nothing is left to retry, the way the spool worker does (minus the backoff)."""
    out = Delivery()
    pending: pl.DataFrame | None = frame
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
                assert len(exc.reasons) == exc.rejected_rows.height
                out.dead_letter.update(zip(ids(exc.rejected_rows), exc.reasons, strict=True))
            pending = exc.retry_rows
            out.retried.append(ids(pending))
    return out
