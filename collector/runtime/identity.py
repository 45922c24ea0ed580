"""Fleet-wide identity of what a collector delivers.

A fleet writes into one bucket, one lake folder, one index. Every id that reaches a shared
destination (file name, S3 key, ``record_id``, ES ``_id``, Firehose line id, IoT Analytics
``messageId``) is therefore built from

    <device slug>-<instance id>-<first log offset:012d>-<last log offset:012d>[-<part:04d>]

- the **device slug**: the configured device id when it is short and plain (``[A-Za-z0-9_.-]``,
  at most 40 bytes), else a readable prefix plus ``_`` and 10 hex digits of its SHA-256, so any
  device id gives a short, path-safe, collision-resistant slug;
- the **instance id**: 8 hex digits created once per data dir (``state/instance-id``), kept
  across restarts, new when the data dir is new, so a device re-flashed with an empty data dir
  never reuses the ids of its previous life (its log offsets start again at 0);
- the **log offsets** of the first and last device-log record behind the batch, which make the
  id the same on every retry and every replay after a crash, so destinations overwrite instead
  of duplicating.

``record_id`` is ``<batch id>:<row>``; readers dedupe on it. The longest batch id is
40 + 1 + 8 + 1 + 12 + 1 + 12 + 5 = 80 bytes: with the row number it stays far below IoT
Analytics' 128-character ``messageId``, ES's 512-byte ``_id`` and a 255-byte file name.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

from collector.runtime.fsutil import atomic_write

INSTANCE_FILE = Path("state") / "instance-id"
MAX_SLUG = 40
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
_INSTANCE = re.compile(r"[0-9a-f]{8}")
_ID = re.compile(r"-(\d{12})-(\d{12})(?:-(\d{4}))?$")


def device_slug(device: str) -> str:
    """The device id as it appears in ids: itself if short and plain, else prefix + hash."""
    raw = device.encode()
    if len(raw) <= MAX_SLUG and _PLAIN.fullmatch(device) and device.strip("."):
        return device
    digest = hashlib.sha256(raw).hexdigest()[:10]
    prefix = _UNSAFE.sub("_", device)[: MAX_SLUG - 11].strip("._-") or "device"
    return f"{prefix}_{digest}"


def instance_id(data_dir: Path) -> str:
    """This data dir's instance id, created on first use and kept in ``state/instance-id``.

    A damaged file (not 8 hex digits) is replaced by a new id: a new id can only make ids
    unique, never collide with another data dir's.
    """
    path = Path(data_dir) / INSTANCE_FILE
    try:
        text = path.read_text().strip()
        if _INSTANCE.fullmatch(text):
            return text
    except (OSError, UnicodeDecodeError):
        pass
    new = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(new + "\n"))
    return new


def batch_prefix(device: str, instance: str) -> str:
    return f"{device_slug(device)}-{instance}"


def batch_id(prefix: str, first: int, last: int, part: int | None = None) -> str:
    base = f"{prefix}-{first:012d}-{last:012d}"
    return base if part is None else f"{base}-{part:04d}"


def order_key(batch: str) -> tuple[int, int, int, str]:
    """Log order of a batch id (spools send oldest first, whatever the device prefix)."""
    m = _ID.search(batch)
    if m is None:  # an id of an older version: digits only, or unknown; keep it first
        return (-1, -1, -1, batch)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or -1), batch)
