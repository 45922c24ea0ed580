"""The exception tree of edge-collector.

Callers catch by branch, never by message::

    CollectorError
    ├── ConfigError                 bad config; ``collector check`` prints these and exits 2
    │   └── MissingDependencyError  an optional extra is not installed (carries the pip hint)
    ├── SourceError                 a source could not read this tick (counted, the source retries)
    ├── TransformError              a transform failed on a batch
    └── SinkError                   raised by ``Sink.write``; the runtime decides what happens next
        ├── TransientSinkError      retry the same batch later (outage, throttling, 5xx)
        ├── PartialWriteError       some rows went through; retry some, dead-letter others
        └── PermanentSinkError      the service will never accept this batch: dead-letter it

A sink never swallows a failure: it raises one of the three ``SinkError`` kinds and the runtime
(spool + worker) owns backoff, re-spooling and dead-lettering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl


class CollectorError(Exception):
    """Base of every error edge-collector raises on purpose."""


@dataclass
class ConfigIssue:
    """One problem in a config file, located for a human: ``FILE:LINE path: message``."""

    path: str
    message: str
    line: int | None = None
    file: str | None = None

    def __str__(self) -> str:
        # redacted here too, so an issue built anywhere (a plugin, the runtime) cannot print
        # a registered secret or a URL password
        from collector import redact

        where = f"{self.file or '<config>'}:{self.line if self.line is not None else '?'}"
        return redact.text(f"{where} {self.path or '<root>'}: {self.message}")


class ConfigError(CollectorError):
    """The config cannot be used; ``issues`` lists every problem found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class MissingDependencyError(ConfigError):
    """A plugin needs an optional dependency; the message carries the exact install command."""

    def __init__(self, plugin: str, module: str, extra: str) -> None:
        self.plugin, self.module, self.extra = plugin, module, extra
        msg = (
            f"plugin {plugin!r} needs the Python package {module!r}: "
            f"pip install 'edge-collector[{extra}]'"
        )
        super().__init__([ConfigIssue(path="", message=msg)])


class SourceError(CollectorError):
    """A source failed to read this tick; the runtime counts it and tries again next tick."""


class TransformError(CollectorError):
    """A transform failed on a batch."""


class SinkError(CollectorError):
    """Base of the errors ``Sink.write`` may raise."""


class TransientSinkError(SinkError):
    """Try again later: the whole batch stays in the spool and is retried with backoff.

    ``retry_after`` (seconds) lets a sink pass on a server's hint (HTTP 429 Retry-After).
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class PartialWriteError(SinkError):
    """Part of a batch was accepted.

    ``retry_rows`` go back to the spool (only those are re-sent); ``rejected_rows`` go to the
    dead-letter file with ``reasons`` (one string per rejected row, same order).
    """

    retry_rows: pl.DataFrame | None
    rejected_rows: pl.DataFrame | None = None
    reasons: list[str] = field(default_factory=list)
    message: str = "partial write"

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class PermanentSinkError(SinkError):
    """The service will never accept this batch as is: its rows go to the dead-letter file."""
