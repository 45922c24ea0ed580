"""The deterministic part of the runtime: log entries in, batches for each sink out.

Everything this class decides is a function of the log alone (its rows, its record kinds and the
wall clock stored with each record), so replaying the log from a checkpoint after a crash cuts
exactly the same batches with exactly the same ids. That is what lets the lake, S3 and ES
overwrite a replayed batch instead of duplicating it. Batch ids carry the device and the data
dir's instance id as well (see ``identity``), so a fleet's batches never meet in one bucket.

A checkpoint holds the transform state (``statecodec``: JSON and Arrow IPC, no pickle), the
source positions seen in the log, and a reference to each sink's pending rows, which are
appended to a pending file once instead of being rewritten with every checkpoint.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from collector.errors import TransformError
from collector.plugin import BatchConfig, Transform
from collector.runtime import statecodec
from collector.runtime.checkpoint import Checkpoint, CheckpointStore, PendingRef
from collector.runtime.identity import batch_id as make_batch_id
from collector.runtime.log import Entry, Kind, encode_frame
from collector.schema import RECORD_ID

log = logging.getLogger("collector")


@dataclass
class Batch:
    """A cut batch for one sink."""

    sink: str
    batch_id: str
    frame: pl.DataFrame
    wall_us: int


@dataclass
class _Pending:
    frames: list[pl.DataFrame] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0
    first_offset: int | None = None
    first_wall_us: int | None = None
    file: str | None = None
    """The pending file these frames are persisted to (from a checkpoint on), its length and
    how many of ``frames`` it holds."""
    file_bytes: int = 0
    written: int = 0


class Route:
    """One sink's view of the pipeline output: its `where:` filter and its batcher."""

    def __init__(
        self, sink: str, where: str | None, batch: BatchConfig, id_prefix: str = "local"
    ) -> None:
        self.sink = sink
        self.id_prefix = id_prefix
        self.where = where
        self.expr: pl.Expr | None = None
        if where:
            from collector.sqlexpr import compile_expr  # sqlglot: only when SQL is configured

            self.expr = compile_expr(where)
        self.batch = batch
        self.pending = _Pending()

    def select(self, df: pl.DataFrame) -> pl.DataFrame:
        """The rows this sink takes (its `where:`)."""
        if self.expr is None:
            return df
        from collector.sqlexpr import apply_where

        return apply_where(df, self.expr)

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
        first = p.first_offset
        self.pending = _Pending()
        size = self.batch.max_rows
        n_parts = max(1, -(-df.height // size))
        out = []
        for k in range(n_parts):
            part = df.slice(k * size, size)
            batch_id = make_batch_id(self.id_prefix, first, last_offset, k if n_parts > 1 else None)
            part = part.with_columns(
                (pl.lit(f"{batch_id}:") + pl.int_range(pl.len()).cast(pl.String)).alias(RECORD_ID)
            )
            out.append(Batch(self.sink, batch_id, part, wall_us))
        return out


class Pipeline:
    """Transforms + per-sink routes, advanced one log entry at a time."""

    def __init__(self, transforms: list[Transform], routes: list[Route]) -> None:
        self.transforms = transforms
        self.routes = routes
        self.offset = -1  # last processed log offset
        self.positions: dict[str, Any] = {}
        """Source name -> the last position logged with its data, as of ``offset``."""
        self._unsaved: set[str] = set()

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
        if entry.meta and "s" in entry.meta:
            self.positions[str(entry.meta["s"])] = entry.meta.get("p")
        flush = entry.kind == Kind.FLUSH
        if entry.kind == Kind.DATA and entry.frame is not None and entry.frame.height:
            result = self._run_chain(entry.frame, flush=False)
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

    def checkpoint(self, fingerprint: str, store: CheckpointStore) -> Checkpoint:
        """This pipeline's state; pending rows not yet persisted are appended to their files."""
        blobs: list[bytes] = []
        states: list[Any] = []
        for t in self.transforms:
            try:
                states.append(statecodec.encode(t.__getstate__(), blobs))
            except statecodec.StateError as exc:
                if t.ctx.component not in self._unsaved:
                    self._unsaved.add(t.ctx.component)
                    log.warning(
                        "transform %s: state not checkpointed (%s); it restarts empty",
                        t.ctx.component,
                        exc,
                    )
                states.append(None)
        pending: dict[str, PendingRef] = {}
        for r in self.routes:
            p = r.pending
            if p.first_offset is None or p.first_wall_us is None:
                continue
            name = f"{r.sink}-{p.first_offset:012d}.arrows"
            if p.file != name:
                p.file, p.file_bytes, p.written = name, 0, 0
            new = [encode_frame(f) for f in p.frames[p.written :]]
            if new or p.file_bytes == 0:
                p.file_bytes = store.append_pending(name, p.file_bytes, new)
                p.written = len(p.frames)
            pending[r.sink] = PendingRef(
                p.first_offset, p.first_wall_us, p.rows, p.nbytes, name, p.file_bytes
            )
        return Checkpoint(self.offset, fingerprint, states, dict(self.positions), pending, blobs)

    def restore(self, cp: Checkpoint, fingerprint: str, store: CheckpointStore) -> bool:
        """Load a checkpoint, all or nothing; False when the transform chain changed (its
        state then starts empty). Raises CheckpointError/StateError for a damaged one."""
        same = cp.fingerprint == fingerprint and isinstance(cp.transforms, list)
        states: list[Any] = []
        if same:
            assert isinstance(cp.transforms, list)
            if len(cp.transforms) != len(self.transforms):
                raise statecodec.StateError("checkpoint holds state of another transform chain")
            states = [
                None if tree is None else statecodec.decode(tree, cp.blobs)
                for tree in cp.transforms
            ]
        pendings: dict[str, _Pending] = {}
        for r in self.routes:
            ref = cp.pending.get(r.sink)
            if ref is None:
                continue
            frames = [
                pl.read_ipc_stream(io.BytesIO(b))
                for b in store.read_pending(ref.file, ref.file_bytes)
            ]
            pendings[r.sink] = _Pending(
                frames,
                ref.rows,
                ref.nbytes,
                ref.first_offset,
                ref.first_wall_us,
                ref.file,
                ref.file_bytes,
                len(frames),
            )
        gone = {k: v.rows for k, v in cp.pending.items() if k not in {r.sink for r in self.routes}}
        for sink, rows in gone.items():
            log.warning("sink %s is no longer configured: %d pending row(s) dropped", sink, rows)
        for t, state in zip(self.transforms, states, strict=False):
            if state is not None:
                t.__setstate__(state)
        for r in self.routes:
            if r.sink in pendings:
                r.pending = pendings[r.sink]
        self.offset = cp.offset
        self.positions = dict(cp.positions)
        return same
