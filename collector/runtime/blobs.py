"""Content-addressed blob store: the bytes behind rows that refer to a file (camera images).

A row is small and goes through the device log, the transforms and the spools; the file it
describes (an image, any binary) is not copied into those. The ``files`` source copies each file
here *before* its row is handed to the runtime, so the producer's folder can be cleaned at once
and a crash never loses a file whose row was logged::

    <data_dir>/blobs/<sha256>.<ext>     the file's bytes, byte for byte
    <data_dir>/blobs/.<name>.tmp        a copy in progress (removed on start)

Names derive from the content (SHA-256 + the original extension), so the same file taken twice
is stored once, a retried upload reads the same bytes, and a blob name says nothing a row's
reader could abuse: a sink only opens a path whose name matches that shape inside this folder
(:meth:`BlobStore.resolve`), never an arbitrary ``path`` value from the data.

Lifecycle (who may delete a blob). A blob is *referenced* while a row naming it is

- in the device log after the pipeline's offset (transforms may still read the file: ``infer``),
- pending in the batcher of a sink that needs blobs, or in that sink's spool (ready or inflight),
- or held by the source that has just taken it (copied, row not yet logged).

A sink needs blobs when it has a ``blob_column`` (the ``s3`` sink uploading images). The sweep
(:meth:`BlobStore.sweep_due`) runs in the pipeline thread, the only thread that moves rows from
the log to batches to spools, so a row is never between two places while it looks; sink workers
only ever *remove* spool files, which can only make a blob deletable. Blobs not referenced (and
older than ``keep_for``) are deleted; rows already delivered by every blob-needing sink no
longer name them anywhere. Rows of sinks that do not need blobs (the lake) keep their ``path``
text, which then names a file that is gone: the lake holds the row, S3 holds the image.

Not tracked: rows held inside a stateful transform's own state (a window, user code). Such a
transform should not hold ``path`` rows across ticks.

The store is bounded (``blobs.max_bytes``). When a new file does not fit: ``block`` leaves it in
the producer's folder until deliveries free space; ``drop_newest`` dead-letters the new file
(left in place); ``drop_oldest`` deletes the oldest blobs even if still referenced (their rows
then dead-letter at the sink as "blob gone"). Every drop is counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import Field

from collector.plugin import Counters, Model
from collector.runtime.fsutil import fsync_dir
from collector.units import Duration, Size

log = logging.getLogger("collector")

BLOB_NAME = re.compile(r"^[0-9a-f]{64}(\.[a-z0-9]{1,10})?$")
"""``<sha256>`` or ``<sha256>.<ext>``: the only names the store hands out or opens."""
PATH_COLUMN = "path"
"""The column the ``files`` source writes the blob's absolute path to."""
CHUNK = 1024 * 1024


class BlobsConfig(Model):
    """Top-level ``blobs:``: the store that keeps files (images) until their rows are delivered."""

    max_bytes: Size = Field(
        default="1GiB", gt=0, description="Blob store size bound (bytes of the kept files)."
    )
    when_full: str = Field(
        default="block",
        pattern="^(block|drop_oldest|drop_newest)$",
        description="At `max_bytes`: `block` (new files wait in their folder), `drop_oldest` "
        "(delete the oldest blobs; their rows dead-letter at the sink) or `drop_newest` (the "
        "new file goes to the source's dead letter and stays in its folder); counted.",
    )
    keep_for: Duration = Field(
        default="0s",
        ge=0,
        description="Keep a blob at least this long after it was taken, even when delivered "
        "(e.g. for the dashboard's thumbnails).",
    )
    sweep_every: Duration = Field(
        default="10s", gt=0, description="How often delivered blobs are looked for and deleted."
    )


class BlobStoreFull(Exception):
    """A new file does not fit under ``max_bytes`` (``block`` / ``drop_newest``)."""


@dataclass(frozen=True)
class Blob:
    """A stored file: its absolute path in the store, SHA-256 (hex) and size."""

    path: Path
    sha256: str
    size: int


def blob_name(sha256: str, suffix: str) -> str:
    """``<sha256>.<ext>`` with the extension lower-cased, or the bare hash for odd extensions."""
    ext = suffix.lower().lstrip(".")
    return f"{sha256}.{ext}" if re.fullmatch(r"[a-z0-9]{1,10}", ext) else sha256


class BlobStore:
    """The blob folder of one data dir: put (copy, fsync, rename), hold, resolve, sweep."""

    def __init__(
        self, folder: Path, settings: BlobsConfig | None = None, counters: Counters | None = None
    ) -> None:
        self.folder = Path(folder)
        self.settings = settings or BlobsConfig()
        self.counters = counters or Counters()
        self._lock = threading.Lock()
        self._holds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._last_sweep = 0.0
        self._spool_cache: dict[tuple[str, int, int], frozenset[str]] = {}
        for p in self.folder.iterdir() if self.folder.is_dir() else ():  # made on the first put
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)  # a copy a crash cut short
            elif BLOB_NAME.match(p.name):
                with contextlib.suppress(OSError):
                    self._sizes[p.name] = p.stat().st_size

    # -- sizes ------------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def names(self) -> set[str]:
        with self._lock:
            return set(self._sizes)

    # -- put ----------------------------------------------------------------------------------

    def put(self, src: Path, *, hold: bool = True) -> Blob:
        """Copy ``src`` in (hashing on the way), fsync, rename to its content name.

        Raises ``OSError`` when ``src`` cannot be read and :class:`BlobStoreFull` when it does
        not fit (``block``/``drop_newest``). With ``hold`` the blob is held until
        :meth:`release`: the caller's row is not in the log yet, so no sweep may take it.
        """
        size = os.stat(src).st_size
        self._make_room(size)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{uuid.uuid4().hex}.tmp"
        digest = hashlib.sha256()
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            sha = digest.hexdigest()
            name = blob_name(sha, src.suffix)
            dest = self.folder / name
            written = tmp.stat().st_size
            with self._lock:
                if hold:
                    self._holds[name] = self._holds.get(name, 0) + 1
                known = name in self._sizes
                self._sizes[name] = written
            if known and dest.exists():
                tmp.unlink()
                os.utime(dest)  # taken again: `keep_for` counts from now
            else:
                os.replace(tmp, dest)
                fsync_dir(self.folder)
                self.counters.inc("blobs_written_total")
                self.counters.inc("blobs_written_bytes_total", written)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Blob(dest, sha, written)

    def _make_room(self, size: int) -> None:
        limit = self.settings.max_bytes
        if self.total_bytes + size <= limit:
            return
        if self.settings.when_full != "drop_oldest":
            self.counters.inc("blob_store_full_total")
            raise BlobStoreFull(
                f"blob store full ({self.total_bytes} of {limit} bytes; a file of {size} bytes "
                f"waits, when_full: {self.settings.when_full})"
            )
        for name in self._oldest():
            if self.total_bytes + size <= limit:
                return
            self._delete(name, reason="full", unless_held=True)
        if self.total_bytes + size > limit:
            self.counters.inc("blob_store_full_total")
            raise BlobStoreFull(f"a file of {size} bytes is larger than blobs.max_bytes ({limit})")

    def _oldest(self) -> list[str]:
        def mtime(name: str) -> float:
            try:
                return (self.folder / name).stat().st_mtime
            except OSError:
                return 0.0

        with self._lock:
            names = [n for n in self._sizes if n not in self._holds]  # held: row not logged yet
        return sorted(names, key=mtime)

    def release(self, names: Iterable[str]) -> None:
        """The rows naming these blobs are in the device log now (or were never logged)."""
        with self._lock:
            for name in names:
                n = self._holds.get(name, 0) - 1
                if n > 0:
                    self._holds[name] = n
                else:
                    self._holds.pop(name, None)

    # -- read ---------------------------------------------------------------------------------

    def resolve(self, value: Any) -> Path | None:
        """The blob file a row's ``path`` value names, or None when it is not one of ours.

        Row data is untrusted: only a name of the store's own shape directly inside the blob
        folder is accepted, so a row can never make a sink read another file.
        """
        if not isinstance(value, str) or not value:
            return None
        p = Path(value)
        if p.parent.resolve() != self.folder.resolve() or not BLOB_NAME.match(p.name):
            return None
        return self.folder / p.name

    # -- sweep --------------------------------------------------------------------------------

    def _delete(self, name: str, reason: str, unless_held: bool = False) -> bool:
        """Delete one blob; with ``unless_held`` not if a source took it again meanwhile (the
        check and the unlink under the lock that ``put`` takes its hold under)."""
        with self._lock:
            if unless_held and name in self._holds:
                return False
            try:
                (self.folder / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("blob store: cannot delete %s: %s", name, exc)
                return False
            self._sizes.pop(name, None)
        self.counters.inc("blobs_deleted_total", reason=reason)
        return True

    def unheld(self) -> set[str]:
        """Blobs no source holds now: the only ones a sweep that starts now may delete.

        Taken *before* the references are gathered: a blob released later was held at this
        moment, and one released earlier had its row logged before (a source releases a poll's
        blobs when its next poll starts, after the runtime logged the rows).
        """
        with self._lock:
            return {n for n in self._sizes if n not in self._holds}

    def sweep(
        self, referenced: set[str], candidates: set[str] | None = None, now: float | None = None
    ) -> int:
        """Delete blobs nobody refers to or holds and older than ``keep_for``; how many."""
        now = time.time() if now is None else now
        if candidates is None:
            candidates = self.unheld()
        deleted = 0
        for name in sorted(candidates - referenced):
            try:
                age = now - (self.folder / name).stat().st_mtime
            except FileNotFoundError:
                with self._lock:
                    self._sizes.pop(name, None)
                continue
            if age < self.settings.keep_for:
                continue
            deleted += self._delete(name, reason="delivered", unless_held=True)
        return deleted

    def sweep_due(self, runtime: Any, last: bool = False) -> None:
        """Called by the pipeline thread on every loop: sweep every ``sweep_every`` seconds,
        and a ``last`` time when it stops (a `--once` run ends with its blobs swept).

        Never raises: a failed sweep only keeps blobs longer, and is logged.
        """
        now = time.monotonic()
        if not self._sizes or (not last and now - self._last_sweep < self.settings.sweep_every):
            return
        self._last_sweep = now
        try:
            candidates = self.unheld()
            self.sweep(self.references(runtime), candidates)
        except Exception:
            log.exception("blob store sweep failed (blobs are kept)")

    def references(self, runtime: Any) -> set[str]:
        """Blob names still named by rows upstream of a sink that needs them (see the module)."""
        refs: set[str] = set()
        needy = [
            (name, worker)
            for name, worker in runtime.sinks.items()
            if getattr(worker.sink, "blob_column", None)
        ]
        columns = {PATH_COLUMN} | {str(w.sink.blob_column) for _, w in needy}
        device_log = runtime.log
        cursor = getattr(device_log, "_cursor", None)  # the pipeline's place: keep it
        try:
            for entry in device_log.read(runtime.pipeline.offset + 1):
                refs |= self._names_in(entry.frame, columns)
        finally:
            if hasattr(device_log, "_cursor"):
                device_log._cursor = cursor
        names = {name for name, _ in needy}
        for route in runtime.pipeline.routes:
            if route.sink in names:
                for frame in route.pending.frames:
                    refs |= self._names_in(frame, columns)
        seen: set[tuple[str, int, int]] = set()
        for _, worker in needy:
            refs |= self._spool_refs(Path(worker.spool.folder), columns, seen)
        for key in set(self._spool_cache) - seen:
            del self._spool_cache[key]
        return refs

    def _names_in(self, frame: pl.DataFrame | None, columns: set[str]) -> set[str]:
        if frame is None:
            return set()
        out: set[str] = set()
        for col in columns & set(frame.columns):
            series = frame.get_column(col)
            if series.dtype != pl.String:
                continue
            for value in series.drop_nulls().unique():
                name = value.rsplit("/", 1)[-1]
                if BLOB_NAME.match(name):
                    out.add(name)
        return out

    def _spool_refs(
        self, folder: Path, columns: set[str], seen: set[tuple[str, int, int]]
    ) -> set[str]:
        """Names in a spool's ready and inflight batches (a file moving between the two while
        it is read is looked for in the other; a file gone from both was delivered)."""
        from collector.runtime.spool import read_file

        refs: set[str] = set()
        places = (folder, folder / "inflight")
        batch_names = {p.name for d in places if d.is_dir() for p in d.glob("*.arrow")}
        for batch in batch_names:
            for _attempt in range(3):
                found = False
                for d in places:
                    path = d / batch
                    try:
                        st = path.stat()
                        key = (batch, st.st_size, st.st_mtime_ns)
                        if key not in self._spool_cache:
                            self._spool_cache[key] = frozenset(
                                self._names_in(read_file(path), columns)
                            )
                    except FileNotFoundError:
                        continue
                    except (OSError, ValueError, pl.exceptions.PolarsError):
                        continue  # a damaged file: the spool quarantines it on claim
                    seen.add(key)
                    refs |= self._spool_cache[key]
                    found = True
                    break
                if found:
                    break
        return refs


_STORES: dict[Path, BlobStore] = {}
_STORES_LOCK = threading.Lock()


def attach(data_dir: Path, settings: BlobsConfig | None, counters: Counters) -> BlobStore:
    """The runtime's store for ``data_dir`` (made now, replacing one of a previous run)."""
    store = BlobStore(Path(data_dir) / "blobs", settings, counters)
    with _STORES_LOCK:
        _STORES[Path(data_dir).resolve()] = store
    return store


def store_for(data_dir: Path, counters: Counters | None = None) -> BlobStore:
    """The store the runtime attached for ``data_dir``; a default one outside a runtime."""
    key = Path(data_dir).resolve()
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = BlobStore(key / "blobs", None, counters)
        return store


def iter_blob_files(folder: Path) -> Iterator[Path]:
    """The blob files in ``folder`` (for tests and tools)."""
    return (p for p in Path(folder).iterdir() if BLOB_NAME.match(p.name))
