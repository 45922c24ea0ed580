"""The deterministic part of the runtime: log entries in, batches for each sink out.

Everything this class decides is a function of the log alone (its rows, its record kinds and the
wall clock stored with each record), so replaying the log from a checkpoint after a crash cuts
exactly the same batches with exactly the same ids. That is what lets the lake, S3 and ES
overwrite a replayed batch instead of duplicating it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from collector.errors import TransformError
from collector.plugin import BatchConfig, Context, Transform
from collector.runtime.log import Entry, Kind
from collector.schema import RECORD_ID
from collector.sqlexpr import apply_where, compile_expr


@dataclass
class Batch:
    """A cut batch for one sink."""

    sink: str
    batch_id: str
    table: pa.Table
    wall_us: int


@dataclass
class _Pending:
    frames: list[pl.DataFrame] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0
    first_offset: int | None = None
    first_wall_us: int | None = None


class Route:
    """One sink's view of the pipeline output: its `where:` filter and its batcher."""

    def __init__(self, sink: str, where: str | None, batch: BatchConfig) -> None:
        self.sink = sink
        self.where = where
        self.expr = compile_expr(where) if where else None
        self.batch = batch
        self.pending = _Pending()

    def select(self, df: pl.DataFrame) -> pl.DataFrame:
        """The rows this sink takes (its `where:`)."""
        return df if self.expr is None else apply_where(df, self.expr)

    def add(self, df: pl.DataFrame, offset: int, wall_us: int) -> None:
        if df.height == 0:
            return
        p = self.pending
        if p.first_offset is None:
            p.first_offset, p.first_wall_us = offset, wall_us
        p.frames.append(df)
        p.rows += df.height
        p.nbytes += int(df.estimated_size())

    def expired(self, wall_us: int) -> bool:
        """The oldest pending row has waited `max_age` (checked before adding new rows, so a
        5-minute batch of 5-second ticks holds 60 readings, not 61)."""
        p = self.pending
        return p.first_wall_us is not None and wall_us - p.first_wall_us >= self.batch.max_age * 1e6

    def full(self) -> bool:
        p = self.pending
        return p.rows >= self.batch.max_rows or p.nbytes >= self.batch.max_bytes

    def cut(self, last_offset: int, wall_us: int) -> list[Batch]:
        p = self.pending
        if p.first_offset is None:
            return []
        df = pl.concat(p.frames, how="diagonal_relaxed") if len(p.frames) > 1 else p.frames[0]
        base = f"{p.first_offset:012d}-{last_offset:012d}"
        self.pending = _Pending()
        size = self.batch.max_rows
        n_parts = max(1, -(-df.height // size))
        out = []
        for k in range(n_parts):
            part = df.slice(k * size, size)
            batch_id = base if n_parts == 1 else f"{base}-{k:04d}"
            part = part.with_columns(
                (pl.lit(f"{batch_id}:") + pl.int_range(pl.len()).cast(pl.String)).alias(RECORD_ID)
            )
            out.append(Batch(self.sink, batch_id, part.to_arrow(), wall_us))
        return out


class Pipeline:
    """Transforms + per-sink routes, advanced one log entry at a time."""

    def __init__(self, transforms: list[Transform], routes: list[Route]) -> None:
        self.transforms = transforms
        self.routes = routes
        self.offset = -1  # last processed log offset

    def has_pending(self) -> bool:
        return any(r.pending.first_offset is not None for r in self.routes)

    def _run_chain(self, df: pl.DataFrame | None, flush: bool) -> pl.DataFrame | None:
        """Each transform sees what upstream produced (incl. upstream's flush), then flushes."""
        for t in self.transforms:
            parts: list[pl.DataFrame] = []
            if df is not None and df.height:
                t.ctx.counters.inc("transform_rows_in_total", df.height, component=t.ctx.component)
                try:
                    parts.append(t.apply(df))
                except Exception as exc:
                    raise TransformError(f"transform {t.ctx.component}: {exc}") from exc
            if flush:
                try:
                    extra = t.flush()
                except Exception as exc:
                    raise TransformError(f"transform {t.ctx.component} flush: {exc}") from exc
                if extra is not None and extra.height:
                    parts.append(extra)
            if len(parts) > 1:
                df = pl.concat(parts, how="diagonal_relaxed")
            else:
                df = parts[0] if parts else None
            if df is not None and df.height:
                t.ctx.counters.inc("transform_rows_out_total", df.height, component=t.ctx.component)
            if df is None and not flush:
                return None
        return df

    def process(self, entry: Entry) -> list[Batch]:
        """Advance by one log entry; the batches it completes, in order."""
        out: list[Batch] = []
        flush = entry.kind == Kind.FLUSH
        if entry.kind == Kind.DATA and entry.table is not None and entry.table.num_rows:
            frame = pl.from_arrow(entry.table)
            assert isinstance(frame, pl.DataFrame)
            result = self._run_chain(frame, flush=False)
        elif flush:
            result = self._run_chain(None, flush=True)
        else:
            result = None
        selected: list[pl.DataFrame | None] = []
        for r in self.routes:  # every filter first: a failing one leaves no route half-fed
            if result is None or not result.height:
                selected.append(None)
                continue
            try:
                selected.append(r.select(result))
            except Exception as exc:
                raise TransformError(f"sink {r.sink} where: {exc}") from exc
        for r, rows in zip(self.routes, selected, strict=True):
            if r.expired(entry.wall_us):
                out.extend(r.cut(entry.offset - 1, entry.wall_us))
            if rows is not None:
                r.add(rows, entry.offset, entry.wall_us)
            if flush or r.full():
                out.extend(r.cut(entry.offset, entry.wall_us))
        self.offset = entry.offset
        return out

    # -- checkpoints ------------------------------------------------------------------------

    def snapshot(self, fingerprint: str) -> bytes:
        return pickle.dumps(
            {
                "offset": self.offset,
                "fingerprint": fingerprint,
                "transforms": self.transforms,
                "routes": {r.sink: r.pending for r in self.routes},
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )

    def restore(
        self, blob: bytes, fingerprint: str, contexts: list[Context], configs: list[Any]
    ) -> bool:
        """Load a snapshot; False (and only the offset kept) when the chain changed."""
        state = pickle.loads(blob)
        self.offset = state["offset"]
        same = state["fingerprint"] == fingerprint
        if same:
            self.transforms = state["transforms"]
            for t, ctx, cfg in zip(self.transforms, contexts, configs, strict=True):
                t.ctx, t.config = ctx, cfg
        for r in self.routes:
            pending = state["routes"].get(r.sink)
            if pending is not None:
                r.pending = pending
        return same
