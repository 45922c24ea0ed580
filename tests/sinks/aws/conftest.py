"""A real moto server process per xdist worker, fake credentials, and helpers for AWS sink tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collector.errors import PartialWriteError, TransientSinkError
from collector.plugin import Context, Sink
from collector.schema import POLARS_SCHEMA, RECORD_ID
from collector.testing import free_port, moto_server

SCHEMA: dict[str, pl.DataType] = {**POLARS_SCHEMA, RECORD_ID: pl.String()}
REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``python -m moto.server`` process for this worker, on a free port."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake static credentials and no shared config, so nothing reaches real AWS."""
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "AWS_ENDPOINT_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def admin(service: str, url: str) -> Any:
    """A plain boto3 client on the moto server, for setup and reading back."""
    import boto3

    return boto3.client(
        service,
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="AKIDTESTING",
        aws_secret_access_key="testing-secret",
    )


@pytest.fixture
def bucket(moto_url: str, aws_env: None) -> str:
    name = f"lake-{uuid.uuid4().hex[:12]}"
    admin("s3", moto_url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    return Context(device="edge-01", component="sink", data_dir=tmp_path)


def readings(
    n: int,
    batch_id: str = "000000000000-000000000099",
    *,
    start: datetime = datetime(2024, 1, 1, 23, 0, tzinfo=UTC),
    step: timedelta = timedelta(seconds=5),
    metrics: tuple[str, ...] = ("temperature", "humidity"),
    devices: tuple[str, ...] = ("edge-01",),
) -> pl.DataFrame:
    """``n`` canonical readings with ``record_id``; crosses midnight so dates differ."""
    import random

    rnd = random.Random(n)
    rows: dict[str, list[Any]] = {k: [] for k in SCHEMA}
    for i in range(n):
        rows["ts"].append(start + step * i)
        rows["device"].append(devices[i % len(devices)])
        rows["source"].append("room")
        metric = metrics[i % len(metrics)]
        rows["metric"].append(metric)
        rows["value"].append(None if i % 17 == 16 else rnd.uniform(0, 30))
        rows["unit"].append("C" if metric == "temperature" else None)
        rows[RECORD_ID].append(f"{batch_id}:{i}")
    return pl.DataFrame(rows, schema=SCHEMA)


def from_ndjson(blobs: list[bytes]) -> list[dict[str, Any]]:
    """Rows decoded from concatenated Firehose record bytes."""
    out = []
    for blob in blobs:
        for line in blob.splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def as_json_rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """The frame's rows as the JSON a Firehose line should decode to."""
    rows = frame.to_dicts()
    for row in rows:
        ts = row["ts"].astimezone(UTC)
        text = ts.strftime("%Y-%m-%dT%H:%M:%S")
        if ts.microsecond:
            text += f".{ts.microsecond:06d}".rstrip("0")
        row["ts"] = text + "Z"
    return rows


async def deliver(
    sink: Sink,
    frame: pl.DataFrame,
    batch_id: str,
    attempts: int = 30,
    on_retry: Callable[[int], None] | None = None,
) -> list[str]:
    """Stand-in for the runtime's spool worker: retry until nothing is left to send.

    Returns the error kinds seen. Rejected rows fail the test: none are expected here.
    """
    seen: list[str] = []
    pending: pl.DataFrame | None = frame
    for attempt in range(attempts):
        if pending is None or pending.height == 0:
            return seen
        try:
            await sink.write(pending, batch_id)
            pending = None
        except TransientSinkError as exc:
            seen.append(f"transient: {exc}")
        except PartialWriteError as exc:
            assert exc.rejected_rows is None, exc.reasons
            seen.append(f"partial: {exc}")
            pending = exc.retry_rows
        if on_retry is not None:
            on_retry(attempt)
    if pending is not None and pending.height:
        raise AssertionError(f"not delivered after {attempts} attempts: {seen[-3:]}")
    return seen


class Outage:
    """A TCP forwarder to the moto server that can be taken down and brought back on one port.

    While down nothing listens on the port (connection refused) and open connections are cut,
    which is what a device sees when its uplink or the endpoint goes away.
    """

    def __init__(self, target: str) -> None:
        host_port = target.removeprefix("http://")
        self.target_host, port = host_port.split(":")
        self.target_port = int(port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: Any = None
        self._writers: set[Any] = set()

    async def up(self) -> None:
        import asyncio

        async def pipe(reader: Any, writer: Any) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def handle(reader: Any, writer: Any) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                writer.close()
                return
            self._writers |= {writer, up_writer}
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            self._writers -= {writer, up_writer}

        self._server = await asyncio.start_server(handle, "127.0.0.1", self.port)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None
