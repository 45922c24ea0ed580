"""A kit for testing pipelines in-process: ``run_once``, ``ListSink``, ``FakeClock``.

Users test their configs and plugins the way the project's own tests do::

    from collector.testing import ListSink, run_once
    run_once({"sources": [...], "sinks": [{"type": "collector.testing:ListSink", "name": "out"}]},
             data_dir=tmp_path)
    rows = ListSink.rows("out")
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pyarrow as pa
import yaml

from collector.config import LoadedConfig, load_text
from collector.plugin import Sink, SinkConfig


class FakeClock:
    """A clock you advance by hand; pass ``clock.now`` where a ``Context.clock`` is expected."""

    def __init__(self, start: datetime | None = None) -> None:
        self.t = start or datetime(2024, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> datetime:
        self.t += timedelta(seconds=seconds)
        return self.t


class ListSink(Sink):
    """Keeps every table it is given, by sink name, in this process."""

    Config = SinkConfig
    description = "Test sink: keeps batches in memory (collector.testing:ListSink)."
    received: ClassVar[dict[str, list[tuple[str, pa.Table]]]] = defaultdict(list)

    async def write(self, table: pa.Table, batch_id: str) -> None:
        self.received[self.ctx.component].append((batch_id, table))

    @classmethod
    def rows(cls, name: str) -> pl.DataFrame:
        tables = [t for _, t in cls.received.get(name, [])]
        if not tables:
            return pl.DataFrame()
        return pl.concat([pl.from_arrow(t) for t in tables], how="diagonal_relaxed")  # type: ignore[misc]

    @classmethod
    def reset(cls) -> None:
        cls.received.clear()


def load_config(config: dict[str, Any] | str | Path) -> LoadedConfig:
    """A validated config from a dict, YAML text or a file path."""
    if isinstance(config, dict):
        return load_text(yaml.safe_dump(config), "<test config>")
    p = Path(config)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return load_text(p.read_text(), str(p))
    return load_text(str(config))


def run_once(config: dict[str, Any] | str | Path, data_dir: Path | str) -> int:
    """`collector run --once` in-process; returns its exit code."""
    from collector.runner import Runtime

    cfg = load_config(config)
    cfg.settings.telemetry.enabled = False
    return asyncio.run(Runtime(cfg, Path(data_dir)).run(once=True))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0, proc: Any = None) -> None:
    """Return once ``url`` answers HTTP at all (any status); RuntimeError after ``timeout``."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server process exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {last}")


@contextlib.contextmanager
def moto_server(log_file: Path | None = None) -> Iterator[str]:
    """A real ``moto.server`` process on a free loopback port; yields its URL.

    Point sinks at it with ``endpoint_url`` (and fake ``AWS_ACCESS_KEY_ID``/``SECRET``): S3 and
    Firehose answer over HTTP as AWS would, so tests exercise the real clients.
    """
    import subprocess
    import sys

    port = free_port()
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
        stdout=out, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", proc=proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_file:
            out.close()  # type: ignore[union-attr]
