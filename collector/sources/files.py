"""Files a producer writes into a folder (a camera app's images, any binary) as readings.

Each settled file becomes one row of the canonical schema (``metric`` e.g. ``image``, ``value``
null) plus ``path`` (the absolute path of its copy in the blob store), ``file`` (its original
name), ``bytes``, ``sha256`` and ``content_type``. The copy is made, fsynced and renamed into
``<data_dir>/blobs/`` (:mod:`collector.runtime.blobs`) *before* the row is handed to the
runtime, so the producer's folder can be emptied and a crash never loses an image whose row was
logged.

Why the details:

- **Settle.** A file whose modification time is younger than ``settle`` is still being written:
  it is left for a later poll. A file that changes while it is copied is dropped from this poll
  too (its blob is swept), and taken once it is quiet.
- **Order and position.** Files are taken oldest first by (mtime, name). The position is the
  key of the last file taken, so with ``after: keep`` a file is never taken twice across
  restarts, in constant space; a file that appears later with an *older* mtime (copied with its
  time preserved) is still noticed while the collector runs (it is not among the files known
  to be taken), but one that arrived while the collector was stopped is not.
- **Delete and move wait for the log.** ``after: delete | move`` acts on a file only on the next
  poll, when the runtime has logged its row (the runtime reads ``position()`` and logs the rows
  between two polls), or at the next start for the files named in the last logged position. A
  kill -9 between the copy and the log leaves the original in place; it is taken again.
- **One bad file costs itself.** A file that cannot be read, is empty, or fails the cheap
  structural check of its image format (PNG/JPEG/GIF/BMP/WebP, e.g. a truncated upload) goes to
  the source's dead letter with the reason, stays in the folder, and is not taken again; the
  poll goes on with the next file. Symlinks and hidden files (``.name``, a writer's temp file)
  are never taken: the folder's content is data, and data never opens other files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import time
import zoneinfo
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import polars as pl
from pydantic import Field, field_validator, model_validator

from collector.plugin import Context, Source, SourceConfig
from collector.runtime import blobs
from collector.schema import POLARS_SCHEMA
from collector.units import Duration, TimeZone

EXTRA_SCHEMA: dict[str, pl.DataType] = {
    "path": pl.String(),
    "file": pl.String(),
    "bytes": pl.Int64(),
    "sha256": pl.String(),
    "content_type": pl.String(),
}
"""Columns a `files` row has beside the canonical ones."""
ROW_SCHEMA: dict[str, pl.DataType] = {**POLARS_SCHEMA, **EXTRA_SCHEMA}
CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "webp": "image/webp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "heic": "image/heic",
    "pgm": "image/x-portable-graymap",
    "ppm": "image/x-portable-pixmap",
    "npy": "application/octet-stream",
    "json": "application/json",
    "csv": "text/csv",
    "txt": "text/plain",
    "wav": "audio/wav",
    "mp4": "video/mp4",
}
"""Fixed, so a row's type never depends on the device's /etc/mime.types."""
DEFAULT_TYPE = "application/octet-stream"


def content_type(name: str) -> str:
    """The MIME type of a file name's extension (``application/octet-stream`` if unknown)."""
    return CONTENT_TYPES.get(Path(name).suffix.lower().lstrip("."), DEFAULT_TYPE)


def check_format(path: Path, ctype: str) -> str | None:
    """Why the file is not a whole file of its image type (None when it looks whole).

    Cheap, structural (head and tail bytes only): catches the common damage of a camera folder,
    an empty file or an upload cut short, without decoding the image.
    """
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with open(path, "rb") as fh:
        head = fh.read(16)
        fh.seek(max(0, size - 32))
        tail = fh.read(32)
    if ctype == "image/png":
        if not head.startswith(b"\x89PNG\r\n\x1a\n"):
            return "not a PNG (bad signature)"
        if tail[-8:-4] != b"IEND":
            return "truncated PNG (no IEND chunk at the end)"
    elif ctype == "image/jpeg":
        if not head.startswith(b"\xff\xd8\xff"):
            return "not a JPEG (no SOI marker)"
        if b"\xff\xd9" not in tail:
            return "truncated JPEG (no EOI marker at the end)"
    elif ctype == "image/gif":
        if not head.startswith((b"GIF87a", b"GIF89a")):
            return "not a GIF (bad signature)"
        if not tail.rstrip(b"\x00").endswith(b";"):
            return "truncated GIF (no trailer)"
    elif ctype == "image/bmp":
        if not head.startswith(b"BM"):
            return "not a BMP (bad signature)"
        if int.from_bytes(head[2:6], "little") > size:
            return "truncated BMP (shorter than its header says)"
    elif ctype == "image/webp":
        if not (head.startswith(b"RIFF") and head[8:12] == b"WEBP"):
            return "not a WebP (bad RIFF header)"
        if int.from_bytes(head[4:8], "little") + 8 > size:
            return "truncated WebP (shorter than its header says)"
    return None


class FilesConfig(SourceConfig):
    """Config of the `files` source."""

    type: Literal["files"] = Field(default="files", description="Plugin name.")
    every: Duration | None = Field(default=2.0, gt=0, description="Poll interval, e.g. `2s`.")
    path: str = Field(description="Folder the producer (camera app) writes files into.")
    glob: str = Field(
        default="*", description="Which files of the folder, e.g. `*.png` or `**/*.jpg`."
    )
    settle: Duration = Field(
        default="2s",
        ge=0,
        description="A file modified within this time is still being written: not taken yet.",
    )
    after: Literal["keep", "delete", "move"] = Field(
        default="keep",
        description="What happens to a taken file once its row is logged: `keep` (never taken "
        "again), `delete`, or `move` to `move_to`.",
    )
    move_to: str | None = Field(default=None, description="Folder for `after: move`.")
    metric: str = Field(default="image", min_length=1, description="The rows' `metric`.")
    time_pattern: str | None = Field(
        default=None,
        description="Regex finding the event time in the file name (group `ts`, else group 1, "
        "else the match), e.g. `(\\d{8}_\\d{6})`; default, or no match: the file's mtime.",
    )
    time_format: str | None = Field(
        default=None,
        description="strptime format of that text, e.g. `%Y%m%d_%H%M%S`; default: ISO 8601, "
        "or digits as epoch seconds (10) / milliseconds (13).",
    )
    timezone: TimeZone = Field(
        default="UTC", description="IANA zone of name times written without an offset."
    )
    max_files: int = Field(
        default=100, gt=0, description="Most files taken per poll (the rest wait for the next)."
    )
    verify: bool = Field(
        default=True,
        description="Dead-letter empty files and images whose head/tail show they are cut short "
        "or not of their extension's type (PNG, JPEG, GIF, BMP, WebP).",
    )

    @field_validator("glob")
    @classmethod
    def _inside(cls, value: str) -> str:
        if not value or value.startswith("/") or ".." in Path(value).parts:
            raise ValueError("glob must be a relative pattern inside `path` (no `/…`, no `..`)")
        return value

    @field_validator("time_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _move_target(self) -> FilesConfig:
        clash = sorted(set(self.tags) & set(EXTRA_SCHEMA))
        if clash:
            raise ValueError(f"tag name(s) {', '.join(clash)} clash with the files source's "
                             f"columns ({', '.join(EXTRA_SCHEMA)})")
        if self.after == "move" and not self.move_to:
            raise ValueError("`after: move` needs `move_to`")
        if self.move_to and self.after != "move":
            raise ValueError("`move_to` applies to `after: move` only")
        if self.move_to and Path(self.move_to).resolve() == Path(self.path).resolve():
            raise ValueError("`move_to` must be another folder than `path`")
        return self


Key = tuple[int, str]
"""(mtime in ns, relative name): the order files are taken in."""


class FilesSource(Source):
    """Polls a folder; each settled file is copied to the blob store and becomes one row."""

    Config = FilesConfig
    description = "Files a camera app (or any producer) writes into a folder, one row per file."
    example = """\
- name: camera
  type: files
  path: /var/camera/out
  glob: "*.png"
  settle: 2s
  after: move
  move_to: /var/camera/done
  time_pattern: "(\\\\d{8}_\\\\d{6})"
  time_format: "%Y%m%d_%H%M%S"
"""
    requires: ClassVar[dict[str, str]] = {}
    extra_schema: ClassVar[dict[str, pl.DataType]] = EXTRA_SCHEMA
    """Typed columns beside the canonical ones; the runtime keeps them (``Runtime._append``)."""

    @staticmethod
    def extra_columns(config: Any) -> dict[str, pl.DataType]:
        """Columns ``collector check`` adds to the canonical ones for `where:` and SQL."""
        return dict(EXTRA_SCHEMA)

    def __init__(self, config: FilesConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.config: FilesConfig = config
        self.folder = Path(config.path).expanduser()
        self._pattern = re.compile(config.time_pattern) if config.time_pattern else None
        self._zone = zoneinfo.ZoneInfo(config.timezone)
        self._mark: Key | None = None
        self._known: dict[str, tuple[int, int]] = {}
        """Files at or below the mark present in the folder: taken (or rejected) already."""
        self._first_scan = True
        self._handed: list[list[Any]] = []
        """[name, mtime_ns, size] of files whose rows the runtime is logging now (delete/move
        acts on them at the next poll, or at the next start from the logged position)."""
        self._held: list[str] = []
        self._store: blobs.BlobStore | None = None
        self._full_logged = False

    # -- position -----------------------------------------------------------------------------

    def position(self) -> dict[str, Any] | None:
        if self._mark is None and not self._handed:
            return None
        return {
            "mtime_ns": self._mark[0] if self._mark else None,
            "name": self._mark[1] if self._mark else None,
            "handed": [list(h) for h in self._handed],
        }

    def resume(self, position: dict[str, Any]) -> None:
        if position.get("mtime_ns") is not None:
            self._mark = (int(position["mtime_ns"]), str(position["name"]))
        self._handed = [
            [str(h[0]), int(h[1]), int(h[2])] for h in position.get("handed") or []
        ]

    # -- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        # a missing folder is not fatal here: a camera's folder may be mounted after boot, so
        # each poll fails (counted, logged once a minute) until it is there
        self._store = blobs.store_for(self.ctx.data_dir, self.ctx.counters)

    async def close(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._held and self._store is not None:
            self._store.release(self._held)
        self._held = []

    # -- polling ------------------------------------------------------------------------------

    def read(self) -> pl.DataFrame:
        """One poll: finish the last poll's files, then take the settled new ones."""
        if self._store is None:
            self._store = blobs.store_for(self.ctx.data_dir, self.ctx.counters)
        self._release()  # the last poll's rows are in the log now
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder (yet)")
        self._finish_handed()
        rows: list[dict[str, Any]] = []
        for key, name, st in self._candidates():
            if len(rows) >= self.config.max_files:
                break
            try:
                row = self._take(name, st)
            except blobs.BlobStoreFull as exc:
                if self._store.settings.when_full == "drop_newest":
                    self._reject(key, name, st, f"{exc}: file dropped (left in its folder)")
                    continue
                if not self._full_logged:
                    self.ctx.logger.warning("source %s: %s", self.ctx.component, exc)
                    self._full_logged = True
                break  # block: files wait in their folder until deliveries free space
            except FileNotFoundError:
                continue  # the producer took it away again
            except OSError as exc:
                self._reject(key, name, st, f"cannot read: {exc.strerror or exc}")
                continue
            except _Rejected as exc:
                self._reject(key, name, st, str(exc))
                continue
            if row is None:
                continue  # changed while copied: still being written
            self._full_logged = False
            self._advance(key, name, st)
            if self.config.after != "keep":
                self._handed.append([name, st.st_mtime_ns, st.st_size])
            rows.append(row)
        if rows:
            self.ctx.counters.inc("files_taken_total", len(rows), component=self.ctx.component)
        return pl.DataFrame(rows, schema=ROW_SCHEMA)

    def _candidates(self) -> list[tuple[Key, str, os.stat_result]]:
        """Settled regular files not taken yet, oldest first."""
        now_ns = time.time_ns()
        settle_ns = int(self.config.settle * 1e9)
        found: list[tuple[Key, str, os.stat_result]] = []
        present: set[str] = set()
        for p in self.folder.glob(self.config.glob):
            name = p.relative_to(self.folder).as_posix()
            if any(part.startswith(".") for part in Path(name).parts):
                continue  # hidden: a writer's temp file, or not meant for us
            try:
                st = p.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # symlinks and folders are never followed
            present.add(name)
            key = (st.st_mtime_ns, name)
            if self._mark is not None and key <= self._mark:
                if self._first_scan:
                    self._known[name] = (st.st_mtime_ns, st.st_size)
                if self._known.get(name) == (st.st_mtime_ns, st.st_size):
                    continue
                # below the mark, unknown: copied in with an old mtime while running
            if now_ns - st.st_mtime_ns < settle_ns:
                continue
            found.append((key, name, st))
        self._first_scan = False
        for gone in set(self._known) - present:
            del self._known[gone]
        found.sort(key=lambda f: f[0])
        return found

    def _take(self, name: str, st: os.stat_result) -> dict[str, Any] | None:
        assert self._store is not None
        src = self.folder / name
        blob = self._store.put(src)
        self._held.append(blob.path.name)
        after = src.lstat()
        if (after.st_mtime_ns, after.st_size) != (st.st_mtime_ns, st.st_size) or (
            blob.size != st.st_size
        ):
            return None  # its blob is released with the others and swept
        ctype = content_type(name)
        if self.config.verify:
            reason = check_format(blob.path, ctype)
            if reason is not None:
                raise _Rejected(reason)
        return {
            "ts": self._event_time(name, st),
            "device": self.ctx.device,
            "source": self.ctx.component,
            "metric": self.config.metric,
            "value": None,
            "unit": None,
            "path": str(blob.path.resolve()),
            "file": Path(name).name,
            "bytes": blob.size,
            "sha256": blob.sha256,
            "content_type": ctype,
        }

    def _advance(self, key: Key, name: str, st: os.stat_result) -> None:
        if self._mark is None or key > self._mark:
            self._mark = key
        self._known[name] = (st.st_mtime_ns, st.st_size)

    def _reject(self, key: Key, name: str, st: os.stat_result, reason: str) -> None:
        """Dead-letter one file (its name and the reason); it stays and is not taken again."""
        self.ctx.reject(str(self.folder / name), f"{name}: {reason}")
        self._advance(key, name, st)

    def _event_time(self, name: str, st: os.stat_result) -> datetime:
        if self._pattern is not None:
            m = self._pattern.search(Path(name).name)
            if m is not None:
                groups = m.groupdict()
                text = groups.get("ts") or (m.group(1) if m.re.groups else m.group(0))
                with contextlib.suppress(ValueError, OverflowError, OSError):
                    return self._parse_time(text)
            self.ctx.counters.inc("files_time_from_mtime_total", component=self.ctx.component)
        return datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC)

    def _parse_time(self, text: str) -> datetime:
        if self.config.time_format:
            ts = datetime.strptime(text, self.config.time_format)
        elif text.isdigit() and len(text) in (10, 13):
            return datetime.fromtimestamp(int(text) / (1000 if len(text) == 13 else 1), UTC)
        else:
            ts = datetime.fromisoformat(text)
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=self._zone)
        return ts.astimezone(UTC)

    # -- after: delete | move -----------------------------------------------------------------

    def _finish_handed(self) -> None:
        """Delete or move the files of the last poll (their rows are logged now).

        A file is acted on only if it is still the one taken (same mtime and size): a producer
        that wrote a new file under the same name meanwhile keeps it.
        """
        handed, self._handed = self._handed, []
        for name, mtime_ns, size in handed:
            src = self.folder / name
            try:
                st = src.lstat()
            except FileNotFoundError:
                continue
            if (st.st_mtime_ns, st.st_size) != (mtime_ns, size):
                continue
            try:
                if self.config.after == "delete":
                    src.unlink()
                else:
                    self._move(src, name)
            except OSError as exc:
                self.ctx.counters.inc("files_after_errors_total", component=self.ctx.component)
                self.ctx.logger.warning(
                    "source %s: cannot %s %s: %s", self.ctx.component, self.config.after, name, exc
                )

    def _move(self, src: Path, name: str) -> None:
        assert self.config.move_to is not None
        dest = Path(self.config.move_to).expanduser() / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # a reused name (a camera's counter restarted): keep both
            dest = dest.with_name(f"{dest.stem}.{time.time_ns()}{dest.suffix}")
        try:
            os.replace(src, dest)
        except OSError:
            shutil.move(str(src), str(dest))  # another file system


class _Rejected(Exception):
    """The file is not what its name says (empty, truncated): dead letter."""
