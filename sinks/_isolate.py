"""One bad partition costs itself: per-part outcomes of a batch, and which errors are for good.

A sink that writes a batch as several independent parts (lake files, S3 objects) records each
part's fate in an :class:`Outcome` and calls :meth:`Outcome.settle` at the end. The runtime then
sees exactly one of: success; ``TransientSinkError`` (nothing landed, nothing is bad: retry the
whole batch, as before); or ``PartialWriteError`` carrying only the rows to retry and only the
rows that can never be written, each with its reason. The parts that were written stay written,
and because their names derive from the batch id, re-sending the retry rows later never
duplicates them.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import polars as pl

from collector.errors import PartialWriteError, PermanentSinkError, TransientSinkError

PERMANENT_ERRNOS = frozenset(
    {
        errno.ENAMETOOLONG,  # a name or path over the file system's limit
        errno.EINVAL,  # a name the file system cannot hold (e.g. ':' on exFAT)
        errno.EILSEQ,  # bytes the file system's encoding refuses
        errno.EFBIG,  # one file larger than the file system allows (FAT32: 4 GiB)
    }
)
"""``OSError`` numbers that retrying the same write cannot fix: the data itself is the cause.

Not here on purpose: ``ENOSPC``, ``EROFS``, ``EACCES``/``EPERM``, ``EIO``, ``ENOTDIR``. They are
states of the device an operator fixes (free space, remount, permissions), and the rows must
wait for that in the spool instead of going to the dead letter."""


def is_permanent_os_error(exc: BaseException) -> bool:
    """True for an ``OSError`` whose cause is the name or the data, not the device's state."""
    return isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS


@dataclass
class Outcome:
    """Fates of a batch's parts: written, to retry, rejected for good (with the reason)."""

    what: str
    """Who speaks in messages, e.g. ``lake /data/lake`` or ``s3 my-bucket``."""
    written_rows: int = 0
    retry: list[pl.Series] = field(default_factory=list)
    retry_reasons: list[str] = field(default_factory=list)
    rejected: list[tuple[pl.Series, str]] = field(default_factory=list)
    """Row numbers in the batch (``sinks._partition.split_indexed`` hands them out)."""

    def written(self, rows: pl.Series) -> None:
        self.written_rows += len(rows)

    def to_retry(self, rows: pl.Series, reason: str) -> None:
        self.retry.append(rows)
        self.retry_reasons.append(reason)

    def reject(self, rows: pl.Series, reason: str) -> None:
        self.rejected.append((rows, reason))

    def settle(self, frame: pl.DataFrame, batch_id: str) -> None:
        """Return if every part landed; else raise what the runtime must do with the rest."""
        if not self.retry and not self.rejected:
            return
        if not self.rejected and not self.written_rows:
            # nothing landed and nothing is bad: the classic whole-batch retry
            raise TransientSinkError(f"{self.what}: {self.retry_reasons[0]}")
        reasons_seen = {reason for _, reason in self.rejected}
        if not self.retry and not self.written_rows and len(reasons_seen) == 1:
            raise PermanentSinkError(reasons_seen.pop())  # the whole batch, for one reason
        retry_rows = _take(frame, self.retry)
        rejected_rows = _take(frame, [rows for rows, _ in self.rejected])
        # one reason per rejected row, in the rows' (batch) order
        reasons = [
            reason
            for _, reason in sorted(
                (int(i), reason) for rows, reason in self.rejected for i in rows
            )
        ]
        n_retry = retry_rows.height if retry_rows is not None else 0
        n_rejected = rejected_rows.height if rejected_rows is not None else 0
        first = (self.rejected[0][1] if self.rejected else self.retry_reasons[0])[:300]
        raise PartialWriteError(
            retry_rows=retry_rows,
            rejected_rows=rejected_rows,
            reasons=reasons,
            message=f"{self.what}: batch {batch_id}: {self.written_rows} rows written, "
            f"{n_retry} to retry, {n_rejected} rejected ({first})",
        )


def _take(frame: pl.DataFrame, parts: list[pl.Series]) -> pl.DataFrame | None:
    if not parts:
        return None
    rows = pl.concat([p.cast(pl.Int64) for p in parts]).sort()  # batch order, for readers
    return frame[rows]
