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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import polars as pl
import yaml

from collector.config import LoadedConfig, load_text
from collector.plugin import Context, Sink, SinkConfig, Transform

T = TypeVar("T", bound=Transform)


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
    received: ClassVar[dict[str, list[tuple[str, pl.DataFrame]]]] = defaultdict(list)

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        self.received[self.ctx.component].append((batch_id, frame))

    @classmethod
    def rows(cls, name: str) -> pl.DataFrame:
        tables = [t for _, t in cls.received.get(name, [])]
        if not tables:
            return pl.DataFrame()
        return pl.concat(tables, how="diagonal_relaxed")

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
    from collector.runtime.runner import Runtime

    cfg = load_config(config)
    cfg.settings.telemetry.enabled = False
    return asyncio.run(Runtime(cfg, Path(data_dir)).run(once=True))


def run_pipeline(
    config: dict[str, Any] | str | Path,
    ticks: Iterable[tuple[datetime, Any]],
    *,
    source: str = "input",
) -> dict[str, pl.DataFrame]:
    """A config's transforms, sink routing and batching on golden input, in fake time.

    ``ticks`` are ``(wall clock time, data)`` pairs, in order: what a source returned at that
    moment (rows, a dict, a Polars/Arrow frame; ``ts`` defaults to the tick's time). They go
    through the same deterministic pipeline ``collector run`` uses, with the wall clock taken
    from the ticks, so `window`, `max_age` batching and `where:` routing behave as on a device
    without waiting. A stop (flush) ends the run. Returns the rows each sink received, with
    ``record_id`` and a ``batch_id`` column. No threads, no disk, no sources, no sinks::

        out = run_pipeline("my.yaml", [(t0, {"temperature": 21.0}), (t0 + 30s, ...)])
        assert out["lake"].select("mean").to_series().to_list() == [21.5]
    """
    from collector.plugin import Context
    from collector.runtime.log import Entry, Kind
    from collector.runtime.pipeline import Pipeline, Route
    from collector.schema import normalize

    cfg = load_config(config)
    clock = FakeClock()
    transforms = []
    for c in cfg.transforms:
        ctx = Context(
            device=cfg.settings.device, component=c.name, data_dir=Path("."), clock=clock.now
        )
        t = c.cls(c.config, ctx)
        opener = getattr(t, "open", None)
        if callable(opener):
            opener()
        transforms.append(t)
    routes = [Route(c.name, c.config.where, c.config.batch, "test-00000000") for c in cfg.sinks]
    pipeline = Pipeline(transforms, routes)  # type: ignore[arg-type]
    out: dict[str, list[pl.DataFrame]] = {r.sink: [] for r in routes}
    offset = 0

    def feed(entry: Entry) -> None:
        for batch in pipeline.process(entry):
            frame = batch.frame
            assert isinstance(frame, pl.DataFrame)
            out[batch.sink].append(frame.with_columns(pl.lit(batch.batch_id).alias("batch_id")))

    for when, data in ticks:
        clock.t = when
        frame = normalize(data, device=cfg.settings.device, source=source, now=when)
        wall = int(when.timestamp() * 1e6)
        feed(Entry(offset, Kind.DATA, wall, frame))
        offset += 1
    feed(Entry(offset, Kind.FLUSH, int(clock.t.timestamp() * 1e6), None))
    return {
        sink: pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
        for sink, frames in out.items()
    }


def checkpoint_bytes(transform: Transform) -> bytes:
    """A transform's state as a checkpoint file holds it (JSON + Arrow IPC, no pickle)."""
    from collector.runtime import statecodec
    from collector.runtime.checkpoint import Checkpoint

    blobs: list[bytes] = []
    tree = statecodec.encode(transform.__getstate__(), blobs)
    return Checkpoint(0, "test", [tree], blobs=blobs).to_bytes()


def restart_transform(transform: T, ctx: Context | None = None) -> T:
    """What a restart makes of ``transform``: a new instance restored from its checkpointed
    state, as the runtime does it. Plugin authors: the output after this must not change."""
    from collector.runtime import statecodec
    from collector.runtime.checkpoint import Checkpoint

    cp = Checkpoint.from_bytes(checkpoint_bytes(transform))
    assert isinstance(cp.transforms, list)
    fresh = type(transform)(transform.config, ctx or transform.ctx)
    fresh.__setstate__(statecodec.decode(cp.transforms[0], cp.blobs))
    return fresh


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


@dataclass
class MotoServer:
    """A running ``moto.server`` process: its URL and process id (for measurements)."""

    url: str
    pid: int


@contextlib.contextmanager
def start_moto(log_file: Path | None = None) -> Iterator[MotoServer]:
    """A real ``moto.server`` process on a free loopback port, stopped on exit."""
    import subprocess
    import sys

    port = free_port()
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/moto-api/", proc=proc)
        yield MotoServer(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_file:
            out.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def moto_server(log_file: Path | None = None) -> Iterator[str]:
    """A real ``moto.server`` process on a free loopback port; yields its URL.

    Point sinks at it with ``endpoint_url`` (and fake ``AWS_ACCESS_KEY_ID``/``SECRET``): S3 and
    Firehose answer over HTTP as AWS would, so tests exercise the real clients.
    """
    with start_moto(log_file) as server:
        yield server.url


@dataclass
class TokenExchange:
    """A running fake Greengrass token exchange service (see ``fake_token_exchange``)."""

    url: str
    token: str
    requests: list[dict[str, str]]

    @property
    def env(self) -> dict[str, str]:
        """Exactly the variables a Greengrass v2 nucleus gives a component."""
        return {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.url,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": self.token,
        }


@contextlib.contextmanager
def fake_token_exchange(
    token: str = "gg-token",
    access_key: str = "ASIAGREENGRASS",
    secret_key: str = "gg-secret",
    session_token: str = "gg-session-token",
) -> Iterator[TokenExchange]:
    """A loopback stand-in for Greengrass's token exchange service.

    It answers like the ECS container-credentials endpoint botocore's default chain reads
    (403 without the right ``Authorization`` token), so AWS sinks can be shown to work on a
    Greengrass core with no credentials in the config. Every request is recorded.
    """
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization", "")
            requests.append({"path": self.path, "auth": auth})
            if auth != token:
                self.send_response(403)
                self.end_headers()
                return
            expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = json.dumps(
                {
                    "AccessKeyId": access_key,
                    "SecretAccessKey": secret_key,
                    "Token": session_token,
                    "Expiration": expires,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/2016-11-01/credentialprovider/"
    try:
        yield TokenExchange(url, token, requests)
    finally:
        server.shutdown()
        server.server_close()
