"""Per-sink spool: Arrow IPC files a sink worker sends oldest first, deletes on success.

Layout under ``<data_dir>/spool/<sink>/``::

    <batch id>.arrow          ready, sent in log order (the offsets in the batch id)
    inflight/<batch id>.arrow claimed by the worker; returned to ready on start
    dead-letter/*.parquet     rows a sink rejected for good, with reason and sink name

A spool file that cannot be read (truncated, garbage) is moved to ``<data_dir>/quarantine/``,
counted (``corrupt_records_total``, and its rows, when its header still tells them, as
``dropped_rows_total{reason="corrupt"}``) and logged; the worker goes on with the next batch.

Files are written to a temp name, fsynced, renamed. A file is a short header (magic, then the
row count and creation time as JSON) and the batch as a zstd Arrow IPC stream, so the index is
rebuilt on start without reading the data (files of older versions, a bare IPC stream, are still
read). Batch ids are deterministic, so a batch replayed after a crash replaces its own file
instead of adding one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from collector import redact
from collector.plugin import Counters, SpoolConfig
from collector.runtime.fsutil import atomic_write, write_parquet
from collector.runtime.identity import order_key
from collector.runtime.log import encode_frame
from collector.runtime.quarantine import quarantine_file

SPOOL_MAGIC = b"ECSPOOL\x01"
_META_LEN = struct.Struct("<I")
DAMAGED = (OSError, ValueError, pl.exceptions.PolarsError)
"""What reading a damaged spool file raises (Polars' ComputeError for a bad IPC stream)."""


def encode_file(frame: pl.DataFrame, created_ms: int) -> bytes:
    """A spool file's bytes: header (row count, creation time) and the batch."""
    meta = json.dumps({"rows": frame.height, "created_ms": created_ms}).encode()
    return SPOOL_MAGIC + _META_LEN.pack(len(meta)) + meta + encode_frame(frame)


def read_header(path: Path) -> tuple[int, int]:
    """(rows, created_ms) of a spool file, reading only its header.

    A file of an older version (a bare Arrow IPC stream) is read whole; its mtime stands in
    for the creation time.
    """
    with open(path, "rb") as fh:
        head = fh.read(len(SPOOL_MAGIC) + _META_LEN.size)
        if head[: len(SPOOL_MAGIC)] != SPOOL_MAGIC:
            return read_file(path).height, int(path.stat().st_mtime * 1000)
        (n,) = _META_LEN.unpack(head[len(SPOOL_MAGIC) :])
        meta = json.loads(fh.read(n))
    return int(meta["rows"]), int(meta["created_ms"])


def read_file(path: Path) -> pl.DataFrame:
    """The batch of a spool file; raises one of ``DAMAGED`` when it is cut short or garbage."""
    data = path.read_bytes()
    start = 0
    if data.startswith(SPOOL_MAGIC):
        (n,) = _META_LEN.unpack_from(data, len(SPOOL_MAGIC))
        start = len(SPOOL_MAGIC) + _META_LEN.size + n
    return pl.read_ipc_stream(io.BytesIO(memoryview(data)[start:]))


@dataclass
class SpoolItem:
    """A spooled batch."""

    batch_id: str
    rows: int
    nbytes: int
    created_ms: int
    path: Path
    frame: pl.DataFrame | None = None
    """The batch, read and checked when claimed (None until then)."""


class Spool:
    """Bounded, durable queue of batches for one sink."""

    def __init__(
        self,
        folder: Path,
        settings: SpoolConfig,
        sink: str,
        counters: Counters | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.data_dir = Path(data_dir) if data_dir is not None else self.folder.parent.parent
        self.settings = settings
        self.sink = sink
        self.counters = counters or Counters()
        self.inflight_dir = self.folder / "inflight"
        self.dead_dir = self.folder / "dead-letter"
        for d in (self.folder, self.inflight_dir, self.dead_dir):
            d.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for p in self.inflight_dir.glob("*.arrow"):
            os.replace(p, self.folder / p.name)
        self._lock = threading.Lock()
        self._ready: dict[str, SpoolItem] = {}
        self._inflight: dict[str, SpoolItem] = {}
        for p in [*self.folder.glob("*.arrow"), *self.folder.glob("*.corrupt")]:
            item = self._describe(p)
            if item is not None:
                self._ready[item.batch_id] = item
        # rows inherited from the last run count as offered to this run, so that per run
        # spooled = delivered + dead-lettered + dropped + backlog
        self.counters.inc("spooled_rows_total", self.backlog_rows, sink=self.sink)

    def _describe(self, path: Path) -> SpoolItem | None:
        try:
            if path.suffix != ".arrow":  # set aside by an older version, silently
                raise ValueError("file renamed .corrupt by an older version")
            rows, created_ms = read_header(path)
            return SpoolItem(path.stem, rows, path.stat().st_size, created_ms, path)
        except (*DAMAGED, KeyError, struct.error) as exc:
            self._set_aside(path, f"unreadable spool file: {exc}", rows=None)
            return None

    def _set_aside(self, path: Path, reason: str, rows: int | None) -> None:
        """Quarantine a damaged spool file; its rows (if known) count as dropped."""
        quarantine_file(
            self.data_dir,
            path,
            file=f"spool/{self.sink}/{path.name}",
            reason=reason,
            counters=self.counters,
            detail=f"{rows} row(s) lost" if rows is not None else "row count unknown",
        )
        if rows:
            self.counters.inc("dropped_rows_total", rows, sink=self.sink, reason="corrupt")

    # -- state ------------------------------------------------------------------------------

    @property
    def backlog_rows(self) -> int:
        with self._lock:
            return sum(i.rows for i in (*self._ready.values(), *self._inflight.values()))

    @property
    def backlog_bytes(self) -> int:
        with self._lock:
            return sum(i.nbytes for i in (*self._ready.values(), *self._inflight.values()))

    @property
    def oldest_created_ms(self) -> int | None:
        with self._lock:
            items = [*self._ready.values(), *self._inflight.values()]
            return min((i.created_ms for i in items), default=None)

    def has_ready(self) -> bool:
        with self._lock:
            return bool(self._ready)

    def has_room(self, nbytes: int) -> bool:
        """False when adding ``nbytes`` would pass ``max_bytes`` (an empty spool takes any)."""
        used = self.backlog_bytes
        return used == 0 or used + nbytes <= self.settings.max_bytes

    # -- writing ----------------------------------------------------------------------------

    def put(
        self,
        frame: pl.DataFrame,
        batch_id: str,
        created_ms: int | None = None,
        wait_if_full: bool = False,
    ) -> str:
        """Spool a batch: ``"ok"``, ``"dropped"`` (by `when_full`, counted) or ``"full"``.

        ``"full"`` is only returned with `when_full: block` and ``wait_if_full``: the caller
        holds the batch back and tries again. Room is judged on the exact file size.
        """
        created = created_ms if created_ms is not None else int(time.time() * 1000)
        with self._lock:
            if batch_id in self._inflight or batch_id in self._ready:
                return "ok"  # a replay of a batch still queued or being sent: same id, same rows
        data = encode_file(frame, created)
        if not self.has_room(len(data)):
            policy = self.settings.when_full
            if policy == "block" and wait_if_full:
                return "full"
            if policy == "drop_oldest":
                while not self.has_room(len(data)) and self._drop_oldest("spool_full"):
                    pass
            if not self.has_room(len(data)) and policy != "block":
                # drop_newest, or drop_oldest with only batches in flight left: refuse this one
                # (offered all the same: counted as spooled and as dropped)
                self.counters.inc("spooled_rows_total", frame.height, sink=self.sink)
                self.counters.inc(
                    "dropped_rows_total", frame.height, sink=self.sink, reason="spool_full"
                )
                return "dropped"
        path = self.folder / f"{batch_id}.arrow"
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        with self._lock:
            self._ready[batch_id] = SpoolItem(batch_id, frame.height, len(data), created, path)
        self.counters.inc("spooled_rows_total", frame.height, sink=self.sink)
        return "ok"

    def _drop_oldest(self, reason: str) -> bool:
        with self._lock:
            if not self._ready:
                return False
            item = self._ready.pop(min(self._ready, key=order_key))
        item.path.unlink(missing_ok=True)
        self.counters.inc("dropped_rows_total", item.rows, sink=self.sink, reason=reason)
        return True

    def expire(self, now_ms: int | None = None) -> int:
        """Drop ready batches older than `ttl`; returns rows dropped."""
        if self.settings.ttl is None:
            return 0
        limit = (now_ms if now_ms is not None else int(time.time() * 1000)) - int(
            self.settings.ttl * 1000
        )
        with self._lock:
            old = [i for i in self._ready.values() if i.created_ms < limit]
            for i in old:
                del self._ready[i.batch_id]
        for i in old:
            i.path.unlink(missing_ok=True)
            self.counters.inc("dropped_rows_total", i.rows, sink=self.sink, reason="ttl")
        return sum(i.rows for i in old)

    # -- the worker's side --------------------------------------------------------------------

    def claim(self) -> SpoolItem | None:
        """The oldest ready batch that reads back whole, moved to inflight/.

        Damaged files met on the way are quarantined and skipped, so one bad file never
        blocks the batches behind it.
        """
        while True:
            with self._lock:
                if not self._ready:
                    return None
                item = self._ready.pop(min(self._ready, key=order_key))
                dest = self.inflight_dir / item.path.name
                os.replace(item.path, dest)
                item.path = dest
                self._inflight[item.batch_id] = item
            try:
                item.frame = read_file(item.path)
            except DAMAGED as exc:
                if isinstance(exc, OSError) and not item.path.exists():
                    raise
                with self._lock:
                    self._inflight.pop(item.batch_id, None)
                self._set_aside(item.path, f"unreadable spool file: {exc}", rows=item.rows)
                continue
            return item

    @staticmethod
    def read(item: SpoolItem) -> pl.DataFrame:
        """The batch of a claimed item (read when it was claimed)."""
        if item.frame is not None:
            return item.frame
        return read_file(item.path)

    def done(self, item: SpoolItem, delivered_rows: int | None = None) -> None:
        """The sink has the batch: forget it."""
        item.frame = None
        item.path.unlink(missing_ok=True)
        with self._lock:
            self._inflight.pop(item.batch_id, None)
        rows = item.rows if delivered_rows is None else delivered_rows
        self.counters.inc("delivered_rows_total", rows, sink=self.sink)

    def release_if_inflight(self, item: SpoolItem) -> None:
        """Return a claimed batch to the queue unless it was already settled."""
        with self._lock:
            claimed = self._inflight.get(item.batch_id) is item
        if claimed and item.path.exists():
            # if even that fails, the file stays in inflight/, which returns on the next start
            with contextlib.suppress(OSError):
                self.release(item)

    def release(self, item: SpoolItem) -> None:
        """Sending failed: back to ready, still the oldest."""
        item.frame = None
        dest = self.folder / item.path.name
        os.replace(item.path, dest)
        item.path = dest
        with self._lock:
            self._inflight.pop(item.batch_id, None)
            self._ready[item.batch_id] = item

    def replace(self, item: SpoolItem, retry: pl.DataFrame) -> None:
        """Partial success: only ``retry`` rows go back, under the same batch id.

        The retry rows are durable before the claimed file goes: if writing them fails (full
        disk), the whole batch is still there and is sent again.
        """
        with self._lock:
            self._inflight.pop(item.batch_id, None)
        try:
            self.put(retry, item.batch_id, created_ms=item.created_ms)
        except OSError:
            with self._lock:
                self._inflight[item.batch_id] = item
            self.release(item)
            raise
        self.counters.inc("spooled_rows_total", -retry.height, sink=self.sink)
        item.path.unlink(missing_ok=True)

    def dead_letter(self, frame: pl.DataFrame, reasons: str | list[str], batch_id: str) -> Path:
        """Keep rejected rows as Parquet beside the spool, with reason and sink name."""
        n = frame.height
        reason_col = (
            [redact.text(reasons)] * n
            if isinstance(reasons, str)
            else [redact.text(r) for r in reasons]
        )
        if len(reason_col) != n:
            reason_col = (reason_col + [reason_col[-1] if reason_col else "rejected"] * n)[:n]
        frame = dead_letter_columns(frame, reason_col, self.sink)
        path = self.dead_dir / f"{batch_id}-{time.time_ns()}.parquet"
        write_parquet(path, frame, compression="zstd")
        self.counters.inc("dead_letter_rows_total", n, sink=self.sink)
        return path


def dead_letter_columns(frame: pl.DataFrame, reasons: list[str], sink: str) -> pl.DataFrame:
    """``frame`` with the dead-letter columns every dead-letter file has (reason, sink, time)."""
    return frame.with_columns(
        pl.Series("dead_letter_reason", reasons, pl.String),
        pl.lit(sink, pl.String).alias("dead_letter_sink"),
        pl.lit(datetime.now(UTC), pl.Datetime("us", "UTC")).alias("dead_letter_ts"),
    )
