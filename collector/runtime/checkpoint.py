"""Checkpoints: what the pipeline has done, in a format that is checked and cannot run code.

File layout (``state/checkpoint``, the one before it kept as ``state/checkpoint.prev``)::

    b"ECCKPT\\x00\\x02"  <Q header length> header (JSON)  { <Q blob length> blob }*  <I crc32>

The JSON header holds the version, the last processed log offset, the transform chain's
fingerprint, the encoded transform state (see ``statecodec``), the source positions and, per
sink, where its pending (not yet cut) batch is kept. Pending rows are not in the checkpoint: they
are appended once to ``state/pending/<sink>-<first offset>.arrows`` (framed, checksummed Arrow
IPC) when a checkpoint finds them still pending, so a checkpoint stays small whatever a sink's
``max_age`` is, and each row is written at most once.

A checkpoint that cannot be read (damaged, truncated, an old pickle) is quarantined and the one
before it is used; with neither, the runtime replays the whole retained log with empty state.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.runtime.fsutil import atomic_write, fsync_dir

MAGIC = b"ECCKPT\x00\x02"
VERSION = 2
CURRENT = "checkpoint"
PREVIOUS = "checkpoint.prev"
LEGACY = "checkpoint.pkl"
_FRAME = struct.Struct("<II")  # length, crc32 of the frame body


class CheckpointError(ValueError):
    """A checkpoint file is damaged or not a checkpoint of this version."""


@dataclass
class PendingRef:
    """A sink's pending batch as a checkpoint knows it."""

    first_offset: int
    first_wall_us: int
    rows: int
    nbytes: int
    file: str
    file_bytes: int


@dataclass
class Checkpoint:
    offset: int
    fingerprint: str
    transforms: Any = None
    """Encoded transform state (a list, one tree per transform), or None."""
    positions: dict[str, Any] = field(default_factory=dict)
    pending: dict[str, PendingRef] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {
                "version": VERSION,
                "offset": self.offset,
                "fingerprint": self.fingerprint,
                "transforms": self.transforms,
                "positions": self.positions,
                "pending": {k: vars(v) for k, v in self.pending.items()},
                "blobs": len(self.blobs),
            },
            allow_nan=False,
        ).encode()
        parts = [MAGIC, struct.pack("<Q", len(header)), header]
        for blob in self.blobs:
            parts += [struct.pack("<Q", len(blob)), blob]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        if not data.startswith(MAGIC):
            raise CheckpointError("not a checkpoint of this version (no ECCKPT v2 header)")
        if len(data) < len(MAGIC) + 12:
            raise CheckpointError("truncated")
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        if zlib.crc32(body) != crc:
            raise CheckpointError("checksum mismatch (damaged or truncated)")
        pos = len(MAGIC)
        (n,) = struct.unpack_from("<Q", body, pos)
        pos += 8
        try:
            header = json.loads(body[pos : pos + n])
        except ValueError as exc:
            raise CheckpointError(f"unreadable header: {exc}") from None
        pos += n
        if not isinstance(header, dict) or header.get("version") != VERSION:
            raise CheckpointError(f"unknown checkpoint version {header.get('version')!r}")
        blobs = []
        for _ in range(int(header.get("blobs", 0))):
            (m,) = struct.unpack_from("<Q", body, pos)
            pos += 8
            blobs.append(body[pos : pos + m])
            pos += m
        try:
            return cls(
                offset=int(header["offset"]),
                fingerprint=str(header["fingerprint"]),
                transforms=header.get("transforms"),
                positions=dict(header.get("positions") or {}),
                pending={k: PendingRef(**v) for k, v in (header.get("pending") or {}).items()},
                blobs=blobs,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed header: {exc}") from None


class CheckpointStore:
    """The two newest checkpoints of a data dir and the pending-batch files they point to."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.pending_dir = self.dir / "pending"
        self.pending_dir.mkdir(parents=True, exist_ok=True)

    def candidates(self) -> list[Path]:
        """Checkpoint files to try, newest first."""
        return [p for p in (self.dir / CURRENT, self.dir / PREVIOUS) if p.exists()]

    @property
    def legacy(self) -> Path:
        return self.dir / LEGACY

    def write(self, cp: Checkpoint) -> None:
        """Keep the current one as the previous, then write the new one atomically."""
        data = cp.to_bytes()
        current = self.dir / CURRENT
        if current.exists():
            os.replace(current, self.dir / PREVIOUS)
        atomic_write(current, lambda tmp: Path(tmp).write_bytes(data))

    def prune_pending(self, keep: set[str]) -> None:
        for path in self.pending_dir.glob("*.arrows"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    # -- pending files ------------------------------------------------------------------------

    def append_pending(self, name: str, at: int, frames: list[bytes]) -> int:
        """Append framed ``frames`` to pending file ``name`` from byte ``at``; its new length.

        Bytes past ``at`` (written after the last checkpoint, before a crash) are cut first.
        """
        path = self.pending_dir / name
        new = not path.exists()
        with open(path, "ab" if not new else "wb") as fh:
            if fh.tell() != at:
                fh.truncate(at)
                fh.seek(at)
            for frame in frames:
                fh.write(_FRAME.pack(len(frame), zlib.crc32(frame)) + frame)
            fh.flush()
            os.fsync(fh.fileno())
            end = fh.tell()
        if new:
            fsync_dir(self.pending_dir)
        return end

    def read_pending(self, name: str, length: int) -> list[bytes]:
        """The frames in the first ``length`` bytes of ``name``; CheckpointError if damaged."""
        path = self.pending_dir / name
        try:
            with open(path, "rb") as fh:
                data = fh.read(length)
        except OSError as exc:
            raise CheckpointError(f"pending file {name}: {exc.strerror}") from None
        if len(data) < length:
            raise CheckpointError(f"pending file {name} is shorter than its checkpoint says")
        frames, pos = [], 0
        while pos < length:
            if pos + _FRAME.size > length:
                raise CheckpointError(f"pending file {name}: torn frame")
            n, crc = _FRAME.unpack_from(data, pos)
            pos += _FRAME.size
            frame = data[pos : pos + n]
            if len(frame) != n or zlib.crc32(frame) != crc:
                raise CheckpointError(f"pending file {name}: damaged frame")
            frames.append(frame)
            pos += n
        return frames
