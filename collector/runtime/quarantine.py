"""Damaged files and records go here: copied out, counted, logged, never fatal, never silent.

A flipped byte in the device log, a truncated spool file, an unreadable checkpoint: the runtime
keeps the damaged bytes for a human (``<data_dir>/quarantine/``, each with a ``.json`` note of
what it was and why it was set aside), bumps ``corrupt_records_total{file=...}`` and logs at ERROR
what was lost, then carries on with the next good record or file.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from collector.plugin import Counters
from collector.runtime.fsutil import atomic_write

log = logging.getLogger("collector")

FOLDER = "quarantine"


def quarantine(
    data_dir: Path,
    *,
    file: str,
    data: bytes,
    reason: str,
    counters: Counters | None,
    detail: str = "",
) -> Path | None:
    """Keep ``data`` (damaged bytes from ``file``, a path relative to the data dir) aside.

    Returns where it went; None if even that failed (a full disk): the loss is still counted
    and logged, and the caller still goes on.
    """
    if counters is not None:
        counters.inc("corrupt_records_total", file=file)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    name = f"{stamp}-{time.time_ns() % 10**9:09d}-{file.replace('/', '_')}"
    folder = Path(data_dir) / FOLDER
    note = {
        "file": file,
        "reason": reason,
        "detail": detail,
        "bytes": len(data),
        "at": datetime.now(UTC).isoformat(),
    }
    target: Path | None = folder / f"{name}.bin"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        assert target is not None
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
        atomic_write(
            folder / f"{name}.json",
            lambda tmp: Path(tmp).write_text(json.dumps(note, indent=2) + "\n"),
        )
    except OSError as exc:
        log.error("cannot keep damaged data from %s in %s: %s", file, folder, exc)
        target = None
    log.error(
        "damaged data in %s (%s)%s: %d bytes set aside%s",
        file,
        reason,
        f"; {detail}" if detail else "",
        len(data),
        f" in {target}" if target else "",
    )
    return target


def quarantine_file(
    data_dir: Path,
    path: Path,
    *,
    file: str,
    reason: str,
    counters: Counters | None,
    detail: str = "",
) -> None:
    """Move a whole damaged file aside (copy, then remove it from where the runtime reads)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        data = b""
        detail = f"{detail}; unreadable: {exc.strerror}" if detail else f"unreadable: {exc}"
    quarantine(data_dir, file=file, data=data, reason=reason, counters=counters, detail=detail)
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("cannot remove damaged %s: %s", path, exc)
