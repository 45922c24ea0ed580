"""Plugin contracts: what a source, transform or sink module provides.

A plugin is one module holding its pydantic ``Config`` (``extra="forbid"``, every field described)
and its class. Modules import heavy libraries (boto3, elasticsearch, serial…) inside methods, so
``collector check`` can import every config model on a machine without those extras.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collector.units import Duration, Size

RESERVED_COLUMNS = frozenset(
    {
        "ts",
        "time",
        "timestamp",
        "device",
        "source",
        "metric",
        "value",
        "unit",
        "record_id",
        "partial",
        "dead_letter_reason",
        "dead_letter_sink",
        "dead_letter_ts",
    }
)
"""Column names a tag may not take: the canonical schema's and the runtime's own."""


class Model(BaseModel):
    """Base of every config model: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class ComponentConfig(Model):
    """Fields every source, transform and sink accepts."""

    type: str = Field(description="Plugin name; `collector plugins` lists them.")
    name: str | None = Field(
        default=None,
        description="Component name, used in metrics, logs, the `source` column and spool folders.",
        pattern=r"^[A-Za-z0-9_.-]+$",
    )


class SourceConfig(ComponentConfig):
    """Fields every source accepts."""

    every: Duration | None = Field(
        default=None, description="Poll interval of a scheduled source, e.g. `5s`.", gt=0
    )
    cron: str | None = Field(
        default=None, description="Crontab schedule (5 fields, UTC) instead of `every`."
    )
    jitter: Duration | None = Field(
        default=None,
        ge=0,
        description="Random delay up to this long added to each scheduled tick, so a fleet "
        "polling one gateway (or waking on the same cron minute) does not hit it at once.",
    )
    tags: dict[str, str] = Field(
        default_factory=dict, description="Extra string columns added to every reading."
    )
    units: dict[str, str] = Field(
        default_factory=dict, description="Unit per metric, for readings that carry none."
    )

    @field_validator("tags")
    @classmethod
    def _no_reserved_tags(cls, tags: dict[str, str]) -> dict[str, str]:
        clash = sorted(set(tags) & RESERVED_COLUMNS)
        if clash:
            raise ValueError(
                f"tag name(s) {', '.join(clash)} clash with columns every reading "
                f"has ({', '.join(sorted(RESERVED_COLUMNS))})"
            )
        return tags

    @model_validator(mode="after")
    def _one_schedule(self) -> SourceConfig:
        if self.every is not None and self.cron is not None:
            if "every" in self.model_fields_set:
                raise ValueError("give either `every` or `cron`, not both")
            self.every = None  # a plugin's default interval gives way to the user's cron
        if self.cron is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(self.cron, timezone="UTC")
            except ValueError as exc:
                raise ValueError(f"cron: {exc}") from None
        return self


class TransformConfig(ComponentConfig):
    """Fields every transform accepts."""


class BatchConfig(Model):
    """When the runtime cuts a batch for a sink."""

    max_rows: int = Field(default=10_000, gt=0, description="Cut a batch at this many rows.")
    max_bytes: Size = Field(default="4MiB", gt=0, description="Cut at this Arrow size.")
    max_age: Duration = Field(
        default="10s", gt=0, description="Cut when the oldest row has waited this long."
    )


class SpoolConfig(Model):
    """Per-sink spool: where batches wait for their sink, and how big that may grow."""

    max_bytes: Size = Field(default="256MiB", gt=0, description="Spool size bound.")
    ttl: Duration | None = Field(
        default=None, description="Drop batches older than this (counted as `ttl`)."
    )
    when_full: str = Field(
        default="block",
        pattern="^(block|drop_oldest|drop_newest)$",
        description="At `max_bytes`: `block` (the device log holds data back), `drop_oldest` or "
        "`drop_newest`; every dropped row is counted by reason.",
    )
    bandwidth: Size | None = Field(
        default=None, description="Upload cap in bytes per second for this sink."
    )
    priority: int = Field(
        default=0, description="Lower sends first: a sink waits while a lower number has backlog."
    )
    retry_cap: Duration = Field(default="5m", gt=0, description="Longest backoff between retries.")
    retry_base: Duration = Field(default="1s", gt=0, description="First backoff between retries.")
    max_retries: int | None = Field(
        default=None, description="Dead-letter a batch after this many failures (default: never)."
    )


class SinkConfig(ComponentConfig):
    """Fields every sink accepts."""

    where: str | None = Field(
        default=None, description="Polars SQL boolean expression: only matching rows go here."
    )
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Batch cutting.")
    spool: SpoolConfig = Field(default_factory=SpoolConfig, description="Spool bounds and retries.")


@dataclass(frozen=True)
class SinkLimits:
    """A service's hard limits; `collector check` rejects batch settings above them."""

    max_rows: int | None = None
    max_request_bytes: int | None = None
    max_record_bytes: int | None = None


class Counters:
    """Thread-safe named counters a plugin can bump; the runtime exports them as metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.values[key] = self.values.get(key, 0) + amount

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0)

    def snapshot(self) -> list[tuple[tuple[str, tuple[tuple[str, str], ...]], float]]:
        """A consistent copy to iterate over while other threads keep counting."""
        with self._lock:
            return list(self.values.items())


@dataclass
class Context:
    """What the runtime lends a plugin: identity, folders, counters, a clock, a dead-letter."""

    device: str
    component: str
    data_dir: Path
    counters: Counters = field(default_factory=Counters)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("collector"))

    def reject(self, raw: str | bytes, reason: str) -> None:
        """Keep an input the plugin could not read (counted, appended to the dead-letter file).

        Sources call this for malformed lines instead of raising, so one bad line never stops
        a stream and nothing is lost: ``<data_dir>/dead-letter/<component>.ndjson``.
        """
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="backslashreplace")
        self.counters.inc("source_rejected_total", component=self.component)
        folder = self.data_dir / "dead-letter"
        folder.mkdir(parents=True, exist_ok=True)
        rec = {
            "ts": self.clock().isoformat(),
            "component": self.component,
            "reason": reason,
            "raw": raw,
        }
        with open(folder / f"{self.component}.ndjson", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class Plugin:
    """Common class attributes of plugins, shown by `collector plugins`."""

    Config: ClassVar[type[ComponentConfig]]
    description: ClassVar[str] = ""
    example: ClassVar[str] = ""
    requires: ClassVar[Mapping[str, str]] = {}
    """Import name -> extra, checked by `collector check` so a missing extra fails early."""


class Source(Plugin):
    """Produces readings.

    Scheduled sources implement ``read()`` (sync runs in a thread, or async) returning rows, a
    dict, or a Polars/Arrow frame for one tick. Long-lived sources set ``long_lived = True`` and
    implement ``stream()``; ``finite`` ones (a replay) end on their own, which `--once` waits for.
    """

    Config: ClassVar[type[SourceConfig]] = SourceConfig
    long_lived: ClassVar[bool] = False
    finite: ClassVar[bool] = False

    def __init__(self, config: Any, ctx: Context) -> None:
        self.config = config
        self.ctx = ctx

    async def open(self) -> None:
        """Acquire devices/connections; called once before the first read."""

    async def close(self) -> None:
        """Release what ``open`` acquired."""

    def read(self) -> Any:
        raise NotImplementedError

    def stream(self) -> AsyncIterator[Any]:
        raise NotImplementedError

    def position(self) -> dict[str, Any] | None:
        """Where this source stands after the data it last handed over (JSON-able), or None.

        The runtime asks right after each ``read()`` / each item of ``stream()`` and logs the
        answer in the same device-log record as that data, so the position a restart resumes
        from is exactly the last data that reached the log: nothing twice, nothing skipped.
        """
        return None

    def resume(self, position: dict[str, Any]) -> None:
        """Continue after ``position`` (the last one logged); called before ``open()``.

        Not called on a fresh data dir or with ``collector run --from-start``.
        """

    def reference(self) -> dict[str, Any] | None:
        """Where the data last handed over can be read again (JSON-able), or None.

        A source whose input is durable already (a recorded file) answers, e.g., the file, its
        fingerprint and the row range. The device log then keeps this reference instead of the
        rows: nothing is encoded, written and fsynced twice, and the rows go from the source to
        the transforms in memory. Only after a crash, for entries not yet processed, does the
        runtime call ``reread``. Asked right after ``position()``, for non-empty data only.
        """
        return None

    def reread(self, reference: dict[str, Any]) -> Any:
        """The data handed over with ``reference``, again: the same rows in the same order.

        Called from the pipeline thread, possibly while the source streams, and before
        ``open()`` after a restart: it must not touch the streaming state. Raises (any error,
        with a reason a person can act on) when that data is no longer there as it was.
        """
        raise NotImplementedError(f"{type(self).__name__} has no reread()")


class Transform(Plugin):
    """Maps a micro-batch to a micro-batch; stateful ones also ``flush``.

    State (``__getstate__``: the instance's attributes but ``config`` and ``ctx``) is
    checkpointed with the log offset, without pickle (``collector.runtime.statecodec``: plain
    values, containers, datetimes, Polars frames, objects of this package's classes), so a
    restart resumes exactly where the last checkpoint left off. ``collector.testing.
    restart_transform`` shows what a restart makes of a transform.
    """

    Config: ClassVar[type[TransformConfig]] = TransformConfig
    schema_opaque: ClassVar[bool] = False
    """True when the output schema cannot be known without running user code."""

    def __init__(self, config: Any, ctx: Context) -> None:
        self.config = config
        self.ctx = ctx

    def apply(self, df: pl.DataFrame) -> pl.DataFrame:
        raise NotImplementedError

    def flush(self) -> pl.DataFrame | None:
        """Emit held state at shutdown (partial windows); default: nothing held."""
        return None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("ctx", None)
        state.pop("config", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class Sink(Plugin):
    """Delivers Polars frames; raises the ``SinkError`` kinds, never hides a failure.

    A batch arrives as a ``pl.DataFrame`` (canonical columns + ``record_id``). A sink whose
    library wants Arrow converts with ``frame.to_arrow()`` itself, so pyarrow is imported only
    by the sinks that need it, at their first batch, and never on a device that only keeps a
    local lake.
    """

    Config: ClassVar[type[SinkConfig]] = SinkConfig
    limits: ClassVar[SinkLimits] = SinkLimits()
    arrow_batches: ClassVar[bool] = False
    """True: ``write`` receives a ``pyarrow.Table`` instead, as every sink did before the
    runtime went Polars end to end; lets a sink plugin written for that contract run unchanged."""

    def __init__(self, config: Any, ctx: Context) -> None:
        self.config = config
        self.ctx = ctx

    async def open(self) -> None:
        """Connect; called once before the first write (errors here are retried)."""

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Flush and disconnect."""
