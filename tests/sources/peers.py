"""Real peers for the device-source tests: socat pty pairs, mosquitto, helper processes and the
collector CLI itself (conftest.py exposes the fixtures). Every port comes from the OS and every
path from tmp_path, so tests run in parallel under xdist."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
PY = sys.executable


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy (generous: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


async def async_wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or 'condition'}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30
) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SocatPair:
    """Two linked ptys: ``dev`` is the collector's port, ``sim`` the simulated device's."""

    def __init__(self, folder: Path) -> None:
        self.dev = folder / "dev"
        self.sim = folder / "sim"
        self.log = folder / "socat.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("socat") is None:
            pytest.skip("socat is not installed (make test installs it)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "socat",
                    "-d",
                    "-d",
                    f"pty,rawer,echo=0,link={self.dev}",
                    f"pty,rawer,echo=0,link={self.sim}",
                ],
                stderr=log,
            )
        wait_for(lambda: self.dev.exists() and self.sim.exists(), 15, "socat pty links")

    def stop(self) -> None:
        """Unplug: socat exits and removes the links; both ends see the pty hang up."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        wait_for(lambda: not self.dev.is_symlink(), 10, "socat links removed")


@pytest.fixture
def socat_pair(tmp_path: Path) -> Iterator[SocatPair]:
    pair = SocatPair(tmp_path)
    pair.start()
    yield pair
    if pair.proc is not None:
        stop_process(pair.proc)


class Mosquitto:
    """A real broker on 127.0.0.1 at a free port; stop() then start() keeps the port.

    ``settings`` replace anonymous access (e.g. TLS files and a password file)."""

    def __init__(self, folder: Path, settings: str = "allow_anonymous true\n") -> None:
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        # `user root`: when started as root, keep reading the test's private tmp files
        self.conf.write_text(f"user root\nlistener {self.port} 127.0.0.1\n{settings}")
        self.log = folder / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(binary):
            pytest.skip("mosquitto is not installed (make test installs it)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_for(lambda: port_open(self.port), 15, "mosquitto listening")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@contextlib.contextmanager
def helper(
    args: list[str], ready: str | None = None, timeout: float = 30
) -> Iterator[subprocess.Popen[str]]:
    """A helper script of this folder as a process, optionally waiting for a `ready` line."""
    proc = subprocess.Popen([PY, *args], stdout=subprocess.PIPE, text=True, cwd=HERE)
    try:
        if ready is not None:
            wait_line(proc, ready, timeout)
        yield proc
    finally:
        stop_process(proc, signal.SIGKILL)


def wait_line(proc: subprocess.Popen[str], expected: str, timeout: float = 30) -> None:
    """Block until the helper prints ``expected`` (its stdout is line-buffered by flush)."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == expected:
            return
        if not line:
            if proc.poll() is not None:
                raise AssertionError(f"helper exited ({proc.returncode}) before {expected!r}")
            time.sleep(0.05)
    raise AssertionError(f"helper did not print {expected!r} within {timeout}s")


# -- the collector CLI ---------------------------------------------------------------------------


def write_config(path: Path, sources: str, data_dir: Path) -> Path:
    """A config with the given sources block, a fast lake sink and no metrics port."""
    path.write_text(
        f"""\
device: test-gw
data_dir: {data_dir}
telemetry: {{enabled: false}}
sources:
{sources}
sinks:
  - name: lake
    type: lake
    path: {data_dir / "lake"}
    batch: {{max_age: 200ms}}
"""
    )
    return path


def start_collector(config: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [PY, "-m", "collector", "run", str(config), "--log-level", "debug", *extra],
            stdout=fh,
            stderr=fh,
            cwd=ROOT,
        )


def read_lake(lake: Path) -> pl.DataFrame:
    """Everything that landed so far (empty frame when nothing has)."""
    if not any(lake.rglob("*.parquet")):
        return pl.DataFrame()
    for _ in range(20):  # a file may be mid-rename while we glob; read again
        try:
            return pl.read_parquet(f"{lake}/**/*.parquet", hive_partitioning=True)
        except (OSError, pl.exceptions.ComputeError):
            time.sleep(0.1)
    return pl.read_parquet(f"{lake}/**/*.parquet", hive_partitioning=True)


def collector_alive(proc: subprocess.Popen[bytes], log: Path) -> None:
    assert proc.poll() is None, f"collector exited ({proc.returncode}):\n{log.read_text()[-4000:]}"


async def collect(stream: AsyncIterator[Any], out: list[dict[str, Any]]) -> None:
    """Consume a source's stream into ``out`` (run as a task, cancelled by the test)."""
    async for rows in stream:
        out.extend(rows)
