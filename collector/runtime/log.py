"""The durable device log: every tick's readings are appended and fsynced before transforms run.

A segment file (named by its first offset) starts with an 8-byte header and holds records::

    <4s magic> <I body length> <I crc32 of body>
    body: <Q offset> <q wall clock, µs> <B kind> <H meta length> meta (JSON) payload (Arrow IPC)

Every record starts with the same magic, so after a damaged record (a flipped byte, garbage,
a bad length) a reader finds the next good one: it looks for the magic again and accepts a
candidate only if its checksum holds. What lies between is copied to ``quarantine/``, counted and
logged with the offsets it held, and reading goes on. Only damage that reaches the end of the
newest segment (a power cut in the middle of an append) is a torn tail, cut off on open.

``meta`` carries the position of the source that produced the record (``Source.position``), so
a source resumes after exactly the data that reached the log. Offsets are dense and increasing;
the wall clock of each append is stored so the pipeline's time-based decisions (batch age) can
be replayed exactly after a crash. Segments of the first format (no header, no magic) are still
read, without resynchronisation.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import polars as pl

from collector.plugin import Counters
from collector.runtime.fsutil import atomic_write, fsync_dir
from collector.runtime.quarantine import quarantine

_SUFFIX = ".log"
SEGMENT_HEADER = b"ECLOG\x00\x02\n"
RECORD_MAGIC = b"\xe5\xc0\x1e\xc7"
_HEAD = struct.Struct("<4sII")  # magic, body length, crc32
_META = struct.Struct("<QqBH")  # offset, wall clock µs, kind, meta length
_MAX_BODY = 1 << 31
log = logging.getLogger("collector")


class Kind(IntEnum):
    """What a record means to the pipeline."""

    DATA = 0  # readings from a source
    TICK = 1  # time passed (lets batch age cut deterministically on replay)
    FLUSH = 2  # shutdown: flush windows and batches
    REF = 3  # readings logged by reference (meta "r", see Source.reference): a kind of its own,
    # so a version of the collector that predates it stops on it instead of taking it for empty


@dataclass
class Entry:
    """One record read back from the log."""

    offset: int
    kind: Kind
    wall_us: int
    frame: pl.DataFrame | None
    meta: dict[str, Any] | None = None


def encode_frame(frame: pl.DataFrame) -> bytes:
    """Arrow IPC stream, zstd-compressed: about 10x less to write, fsync and read back on a
    device's flash, for less CPU than the I/O it saves. Polars writes and reads it itself, so
    the runtime never needs pyarrow (40 MB of a small device's memory)."""
    sink = io.BytesIO()
    frame.write_ipc_stream(sink, compression="zstd")
    return sink.getvalue()


def decode_frame(data: bytes | memoryview) -> pl.DataFrame:
    return pl.read_ipc_stream(io.BytesIO(data))


@dataclass
class _Rec:
    """A good record found in a segment, at bytes [start, end)."""

    start: int
    end: int
    offset: int
    wall: int
    kind: int
    meta: bytes
    payload: bytes


@dataclass
class _Bad:
    """Damaged bytes [start, end) of a segment; the next good record starts at ``end``."""

    start: int
    end: int


def _is_v2(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(SEGMENT_HEADER)) == SEGMENT_HEADER


def _parse(fh: io.BufferedReader, skip_below: int) -> _Rec | None:
    """The record at the current position if it is whole and its checksum holds, else None."""
    pos = fh.tell()
    head = fh.read(_HEAD.size)
    if len(head) < _HEAD.size:
        return None
    magic, n, crc = _HEAD.unpack(head)
    if magic != RECORD_MAGIC or not _META.size <= n <= _MAX_BODY:
        return None
    if skip_below > 0:
        meta = fh.read(_META.size)
        if len(meta) == _META.size:
            offset = _META.unpack(meta)[0]
            if offset < skip_below:
                fh.seek(n - _META.size, io.SEEK_CUR)
                nxt = fh.peek(len(RECORD_MAGIC))[: len(RECORD_MAGIC)]
                if nxt in (b"", RECORD_MAGIC):
                    return _Rec(pos, fh.tell(), offset, 0, 0, b"", b"")  # below start: not read
        fh.seek(pos + _HEAD.size)  # not skippable after all: read and check it whole
    body = fh.read(n)
    if len(body) < n or zlib.crc32(body) != crc:
        return None
    offset, wall, kind, meta_len = _META.unpack_from(body)
    meta_end = _META.size + meta_len
    if meta_end > n:
        return None
    return _Rec(pos, fh.tell(), offset, wall, kind, body[_META.size : meta_end], body[meta_end:])


def _scan(fh: io.BufferedReader, skip_below: int = -1) -> Iterator[_Rec | _Bad]:
    """Records from the current position on; damaged stretches come out as ``_Bad``."""
    while True:
        pos = fh.tell()
        if not fh.peek(1):
            return
        rec = _parse(fh, skip_below)
        if rec is not None:
            yield rec
            continue
        # resynchronise: the next magic whose record checks out
        fh.seek(pos + 1)
        rest = fh.read()
        end = pos + 1 + len(rest)
        found = end
        at = rest.find(RECORD_MAGIC)
        while at >= 0:
            fh.seek(pos + 1 + at)
            if _parse(fh, -1) is not None:
                found = pos + 1 + at
                break
            at = rest.find(RECORD_MAGIC, at + 1)
        fh.seek(found)
        yield _Bad(pos, found)


def _scan_v1(fh: io.BufferedReader) -> Iterator[_Rec | _Bad]:
    """Records of the first format; it has no magic, so damage ends the segment."""
    while True:
        pos = fh.tell()
        head = fh.read(8)
        if not head:
            return
        if len(head) == 8:
            length, crc = struct.unpack("<II", head)
            body = fh.read(17 + length)
            if len(body) == 17 + length and zlib.crc32(body) == crc:
                offset, wall, kind = struct.unpack("<QqB", body[:17])
                yield _Rec(pos, fh.tell(), offset, wall, kind, b"", body[17:])
                continue
        fh.seek(0, io.SEEK_END)
        yield _Bad(pos, fh.tell())
        return


class DeviceLog:
    """Append-only, segmented, checksummed log of readings."""

    def __init__(
        self,
        folder: Path,
        fsync: str = "every_tick",
        fsync_interval: float = 1.0,
        segment_bytes: int = 64 * 1024 * 1024,
        counters: Counters | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir) if data_dir is not None else self.folder.parent
        self.counters = counters
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._last_sync = 0.0
        self._cursor: tuple[int, Path, int] | None = None  # (next offset, segment, position)
        self._reported: set[tuple[str, int]] = set()
        self.next_offset = 0
        self._recover()

    # -- opening ------------------------------------------------------------------------------

    def _segments(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{_SUFFIX}"))

    def _recover(self) -> None:
        """Check every retained record; set damage aside; find the next offset."""
        segments = self._segments()
        next_offset = 0
        for i, path in enumerate(segments):
            last = i == len(segments) - 1
            next_offset = max(next_offset, int(path.stem), self._repair(path, last))
        if not segments or not _is_v2(segments[-1]):
            self.next_offset = next_offset
            self._open_segment(next_offset)
            return
        self.next_offset = next_offset
        self._fh = open(segments[-1], "ab", buffering=0)  # noqa: SIM115 - kept open for appends
        self._active = segments[-1]

    def _repair(self, path: Path, last: bool) -> int:
        """Verify one segment; returns the offset after its last good record."""
        v2 = _is_v2(path)
        good: list[_Rec] = []
        bad: list[_Bad] = []
        with open(path, "rb") as fh:
            if v2:
                fh.seek(len(SEGMENT_HEADER))
            for item in _scan(fh) if v2 else _scan_v1(fh):
                (good if isinstance(item, _Rec) else bad).append(item)
        if not v2 and not good and path.stat().st_size == 0:
            return int(path.stem)
        if not bad:
            return good[-1].offset + 1 if good else int(path.stem)
        with open(path, "rb") as fh:
            data = fh.read()
        for b in bad:
            before = max((r.offset for r in good if r.end <= b.start), default=None)
            after = min((r.offset for r in good if r.start >= b.end), default=None)
            torn = last and after is None
            lost = _describe_loss(before, after)
            self._quarantine(
                path, data[b.start : b.end], "torn tail" if torn else "damaged record", lost
            )
        tail = bad[-1]
        if last and tail.end == len(data) and len(bad) == 1:
            with open(path, "r+b") as fh:  # only a torn tail: cut it
                fh.truncate(tail.start)
                os.fsync(fh.fileno())
        else:  # rewrite the segment with its good records only
            kept = b"".join(data[r.start : r.end] for r in good)
            header = SEGMENT_HEADER if v2 else b""
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(header + kept))
        return good[-1].offset + 1 if good else int(path.stem)

    def _quarantine(self, path: Path, data: bytes, reason: str, detail: str) -> None:
        quarantine(
            self.data_dir,
            file=f"{self.folder.name}/{path.name}",
            data=data,
            reason=reason,
            counters=self.counters,
            detail=detail,
        )

    def _open_segment(self, first: int) -> None:
        """Switch appends to a new segment; if it cannot be created the current one stays."""
        path = self.folder / f"{first:020d}{_SUFFIX}"
        new = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open for appends
        try:
            if new.tell() == 0:
                new.write(SEGMENT_HEADER)
        except OSError:
            new.close()
            raise
        old = getattr(self, "_fh", None)
        self._fh = new
        self._active = path
        if old is not None:
            old.close()
        fsync_dir(self.folder)

    # -- writing ------------------------------------------------------------------------------

    def append(
        self,
        frame: pl.DataFrame | None,
        kind: Kind = Kind.DATA,
        wall_us: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Append one record durably (per the fsync policy); returns its offset."""
        payload = encode_frame(frame) if frame is not None else b""
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode() if meta else b""
        if len(meta_bytes) > 0xFFFF:
            raise ValueError(f"record meta of {len(meta_bytes)} bytes is over 64 KiB")
        wall = wall_us if wall_us is not None else time.time_ns() // 1000
        with self._lock:
            offset = self.next_offset
            body = _META.pack(offset, wall, int(kind), len(meta_bytes)) + meta_bytes + payload
            head = _HEAD.pack(RECORD_MAGIC, len(body), zlib.crc32(body))
            if self._fh.tell() >= self.segment_bytes:
                self._open_segment(offset)
            self._write_all(head + body)
            self._sync()
            self.next_offset = offset + 1
        return offset

    def _write_all(self, data: bytes) -> None:
        """Write a whole record or nothing: a failed write (disk full) is cut off again, so
        the next append does not land behind half a record."""
        pos = self._fh.tell()
        try:
            view = memoryview(data)
            while view:
                view = view[self._fh.write(view) :]
        except OSError:
            try:
                self._fh.truncate(pos)
                self._fh.seek(pos)
            except OSError:
                pass  # the torn tail is cut on the next open
            raise

    def _sync(self) -> None:
        if self.fsync_policy == "every_tick":
            os.fsync(self._fh.fileno())
        elif self.fsync_policy == "interval":
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_interval:
                os.fsync(self._fh.fileno())
                self._last_sync = now

    def sync(self) -> None:
        """fsync now, whatever the policy (before a checkpoint is written past these records)."""
        with self._lock:
            os.fsync(self._fh.fileno())

    def skip_to(self, offset: int) -> None:
        """Continue numbering at ``offset`` in a new segment.

        After a power cut took the unsynced tail of the log while the checkpoint (fsynced)
        already covers it, new readings must not reuse offsets the pipeline has passed: they
        would be skipped, and their batch ids would collide with batches already delivered.
        """
        with self._lock:
            if offset <= self.next_offset:
                return
            self._open_segment(offset)
            self.next_offset = offset
            self._cursor = None

    def roll(self) -> None:
        """Start a new segment now, so the current one can be deleted once processed (a disk
        running short should not wait for ``segment_bytes``)."""
        with self._lock:
            if self._fh.tell() > len(SEGMENT_HEADER):
                self._open_segment(self.next_offset)
                self._cursor = None

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                try:
                    os.fsync(self._fh.fileno())
                except OSError as exc:  # a full disk: what was synced before stays valid
                    log.error("device log fsync at close: %s", exc)
                self._fh.close()

    # -- reading ------------------------------------------------------------------------------

    def read(self, start: int, end: int | None = None, payload: bool = True) -> Iterator[Entry]:
        """Entries with ``start <= offset < end`` (end defaults to what is appended now).

        A reader that continues where it stopped (the pipeline does) resumes at the byte
        position it reached, instead of scanning its segment from the beginning again. With
        ``payload=False`` frames are not decoded (``frame`` is None): for reading positions.
        Damage found here (after the open-time check) is set aside once and stepped over. Bytes
        appended after the read began are not looked at: a read racing an append can see the
        record half written, and a half-written record is not damage.
        """
        with self._lock:  # between appends: what is written up to here is whole
            appended = self.next_offset
            written = None if self._fh.closed else (self._active, self._fh.tell())
        stop = appended if end is None else end
        segments = self._segments()
        firsts = [int(p.stem) for p in segments]
        cursor = self._cursor if self._cursor and self._cursor[0] == start else None
        for i, path in enumerate(segments):
            nxt = firsts[i + 1] if i + 1 < len(firsts) else None
            if nxt is not None and nxt <= start:
                continue
            if firsts[i] >= stop:
                break
            with open(path, "rb") as fh:
                v2 = fh.read(len(SEGMENT_HEADER)) == SEGMENT_HEADER
                if not v2:
                    fh.seek(0)
                if cursor is not None and cursor[1] == path:
                    fh.seek(cursor[2])
                for rec in _scan(fh, skip_below=start) if v2 else _scan_v1(fh):
                    if isinstance(rec, _Bad):
                        if written and path == written[0] and rec.start >= written[1]:
                            return  # appended since this read began, maybe half: not damage
                        self._report(path, fh, rec)
                        continue
                    if rec.offset >= stop:
                        return
                    if rec.offset < start:
                        continue
                    self._cursor = (rec.offset + 1, path, rec.end)
                    frame = decode_frame(rec.payload) if payload and rec.payload else None
                    meta = json.loads(rec.meta) if rec.meta else None
                    yield Entry(rec.offset, Kind(rec.kind), rec.wall, frame, meta)

    def _report(self, path: Path, fh: io.BufferedReader, bad: _Bad) -> None:
        key = (path.name, bad.start)
        if key in self._reported:
            return
        self._reported.add(key)
        back = fh.tell()
        fh.seek(bad.start)
        data = fh.read(bad.end - bad.start)
        fh.seek(back)
        self._quarantine(path, data, "damaged record", "found while reading")

    def truncate_before(self, offset: int) -> int:
        """Delete whole segments that hold only offsets below ``offset``; returns how many."""
        removed = 0
        segments = self._segments()
        for i, path in enumerate(segments[:-1]):
            if int(segments[i + 1].stem) <= offset:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._segments())


def _describe_loss(before: int | None, after: int | None) -> str:
    if before is not None and after is not None:
        if after - before <= 1:
            return f"between offsets {before} and {after} (no record lost)"
        return f"offsets {before + 1}..{after - 1} lost ({after - before - 1} record(s))"
    if before is not None:
        return f"after offset {before}"
    if after is not None:
        return f"before offset {after}"
    return "no good record in the segment"
