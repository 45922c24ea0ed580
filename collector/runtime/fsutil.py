"""Durable file writes shared by the device log, the spool, checkpoints and the local lake.

A rename is only durable once its folder is fsynced, and a reader must never see half a file:
so every file the collector keeps is written under a temporary name, fsynced, renamed over its
final name, and the folder fsynced.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

USER_UMASK: int | None = None
"""The umask the collector was started with, before `collector run` made its own files
owner-only (None: not changed). Shared outputs such as the lake follow it, not the data dir's."""


def private_files() -> int:
    """Make every file this process creates from now on owner-only; remember the user's umask."""
    global USER_UMASK
    old = os.umask(0o077)
    if USER_UMASK is None:
        USER_UMASK = old
    return old


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMP = re.compile(r"^\..+\.(\d+)-\d+-[0-9a-f]{8}\.tmp$")
STALE_TEMP_S = 3600.0
"""A temporary file of a process on another host is left this long before it counts as stale."""


def remove_stale_temps(root: Path) -> int:
    """Delete the temporary files :func:`atomic_write` left under ``root`` when its process was
    killed mid-write; returns how many.

    Readers of ``*.parquet`` never see them, but a reader given the folder (``pl.scan_parquet
    (root)``) refuses a tree with other file extensions. A file whose process (the pid in its
    name) is alive on this host is left alone for an hour. On storage several hosts share, a
    write in progress elsewhere can be hit: its rename fails and that collector retries.
    """
    removed = 0
    now = time.time()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            m = _TEMP.match(name)
            if m is None:
                continue
            path = Path(folder) / name
            try:
                if _alive(int(m.group(1))) and now - path.stat().st_mtime < STALE_TEMP_S:
                    continue
                path.unlink()
                removed += 1
            except OSError:
                continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)``, fsync, rename over ``path``, fsync the folder.

    The temporary name starts with a dot and ends in ``.tmp``, so lake readers globbing
    ``*.parquet`` never pick it up; on failure it is removed and ``path`` keeps its old content.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-"
                         f"{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_parquet(path: Path, frame: pl.DataFrame, mode: int | None = None, **options: Any) -> None:
    """``frame`` as a Parquet file at ``path``, atomically (see :func:`atomic_write`).

    Encoded in memory first (batches are bounded), then written by Python: Polars reports a
    full disk as a ComputeError like a value Parquet cannot hold, and the two must not be
    confused (one waits for space, the other goes to the dead letter). Here encoding fails with
    a Polars error and the disk with ``OSError``.
    """
    buf = io.BytesIO()
    frame.write_parquet(buf, **options)
    data = buf.getbuffer()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
        if mode is not None:
            os.chmod(tmp, mode)

    atomic_write(path, write)
