"""Local Parquet lake: Hive partitions, zstd, one atomically written file per batch and partition.

The file name is the batch id, so a batch the runtime replays after a crash overwrites its own
file instead of duplicating rows; readers never see a half-written file because the data lands
under a temporary name and is renamed into place after an fsync.

Each partition file is written on its own: a partition that can never be written (a name the
file system refuses, data Parquet cannot hold) goes to the dead letter alone and the batch's
other partitions land; a partition that failed for a reason the device can get over (a full
disk) is retried alone. See ``sinks._isolate``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import Field, field_validator

from collector.errors import PermanentSinkError, TransientSinkError
from collector.plugin import Context, Sink, SinkConfig
from collector.runtime import fsutil
from collector.runtime.fsutil import fsync_dir
from sinks._isolate import Outcome, is_permanent_os_error
from sinks._partition import (
    DEFAULT_PARTITIONS,
    part_name,
    sanitize,
    split_indexed,
    validate_partitions,
)

DEFAULT_FOLDER = "lake"
"""The lake's folder inside the data dir when the config sets no `path`."""


class LakeConfig(SinkConfig):
    """Config of the `lake` sink."""

    type: Literal["lake"] = Field(default="lake", description="Plugin name.")
    path: str | None = Field(
        default=None,
        description="Root folder of the lake; default `<data_dir>/lake`, so a run with "
        "another `--data-dir` never writes into someone else's lake by accident.",
    )
    partition_by: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PARTITIONS),
        description="Hive partition keys, outermost first: columns (e.g. `metric`, `device`) "
        "or time parts of `ts` (date, year, month, day, hour).",
    )
    compression_level: int | None = Field(
        default=None, ge=1, le=22, description="zstd level (default: the library's, 3)."
    )
    private: bool = Field(
        default=False,
        description="Owner-only files and folders like the data dir; by default the lake "
        "follows the umask the collector was started with, so other readers (a dashboard, "
        "a sync job) can read it.",
    )

    @field_validator("partition_by")
    @classmethod
    def _valid_keys(cls, value: list[str]) -> list[str]:
        validate_partitions(value)
        for key in value:
            if sanitize(key) != key:
                raise ValueError(f"partition key {key!r} must be a plain column or time part name")
        if len(set(value)) != len(value):
            raise ValueError("partition_by: each key may appear once")
        return value


class LakeSink(Sink):
    """Writes Hive-partitioned Parquet files (zstd) under a local folder."""

    Config = LakeConfig
    description = "Local Parquet lake, Hive partitions (metric/date), zstd, atomic writes."
    example = """\
- name: lake
  type: lake
  path: ./data/lake
  partition_by: [metric, date]
"""
    requires = {}

    def __init__(self, config: LakeConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        root = Path(config.path).expanduser() if config.path else ctx.data_dir / DEFAULT_FOLDER
        self.root = root.resolve()

    async def open(self) -> None:
        await asyncio.to_thread(self._make_folder, self.root)
        await asyncio.to_thread(fsutil.remove_stale_temps, self.root)

    def _make_folder(self, target: Path) -> None:
        """``target`` and its missing parents, with the lake's folder mode."""
        modes = self._modes()
        missing = [d for d in (target, *target.parents) if not d.exists()]
        target.mkdir(parents=True, exist_ok=True)
        if modes is not None:
            for folder in missing:
                os.chmod(folder, modes[1])

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        if frame.height == 0:
            return
        try:
            validate_partitions(self.config.partition_by, frame.columns)
        except ValueError as exc:
            raise PermanentSinkError(f"lake: {exc}") from None
        if "ts" not in frame.columns and any(
            p not in frame.columns for p in self.config.partition_by
        ):
            raise PermanentSinkError("lake: time partitions need a `ts` column")
        try:
            outcome = await asyncio.to_thread(self._write, frame, batch_id)
        except OSError as exc:  # the root itself: nothing was written
            raise TransientSinkError(f"lake: cannot write under {self.root}: {exc}") from exc
        outcome.settle(frame, batch_id)

    def _write(self, frame: pl.DataFrame, batch_id: str) -> Outcome:
        """Write every partition it can; what happened to each is in the returned Outcome."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = part_name(batch_id)
        outcome = Outcome(f"lake {self.root}")
        for folder, rows, index in split_indexed(frame, self.config.partition_by):
            target = (self.root / folder).resolve()
            if not target.is_relative_to(self.root):  # sanitize() makes this unreachable
                outcome.reject(index, f"lake: partition {folder!r} escapes {self.root}")
                continue
            try:
                self._write_file(target, name, rows)
            except OSError as exc:
                reason = f"lake: cannot write {folder}/{name}: {exc}"
                if is_permanent_os_error(exc):
                    outcome.reject(index, reason + " (retrying cannot fix this)")
                else:
                    outcome.to_retry(index, reason)
            except (pl.exceptions.PolarsError, ValueError, TypeError) as exc:  # Parquet refuses
                outcome.reject(index, f"lake: cannot encode {folder}: {type(exc).__name__}: {exc}")
            else:
                outcome.written(index)
        return outcome

    def _modes(self) -> tuple[int, int] | None:
        """(file, folder) modes from the user's umask; None: leave the process's (private)."""
        umask = fsutil.USER_UMASK
        if self.config.private or umask is None:
            return None
        return 0o666 & ~umask, 0o777 & ~umask

    def _write_file(self, target: Path, name: str, rows: pl.DataFrame) -> None:
        created = not target.exists()
        modes = self._modes()
        if created:
            self._make_folder(target)
        options: dict[str, Any] = {"compression": "zstd"}
        if self.config.compression_level is not None:
            options["compression_level"] = self.config.compression_level
        fsutil.write_parquet(
            target / name, rows, mode=modes[0] if modes is not None else None, **options
        )
        if created:
            # New partition folders must survive a power cut too.
            for parent in target.parents:
                fsync_dir(parent)
                if parent == self.root:
                    break
