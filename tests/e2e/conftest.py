"""Helpers to run the real `collector` CLI as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, config: dict[str, Any]) -> Path:
    config.setdefault("telemetry", {"enabled": False})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Collector:
    """A `collector run` subprocess with its output captured to a file."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        # beside the config, unless that is the repository's own sample_data
        folder = config.parent if ROOT not in config.parents else Path(tempfile.gettempdir())
        self.out = folder / f"{config.stem}.{time.time_ns()}.log"
        self.fh = open(self.out, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "collector", "run", str(config), "--log-level", "debug", *args],
            cwd=ROOT,
            stdout=self.fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        return self.out.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.alive():
                self.proc.kill()
                self.proc.wait()
            self.fh.close()
        return code


def wait_for(
    cond: Callable[[], Any], timeout: float = 60, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_lake(path: Path) -> pl.DataFrame:
    files = sorted(path.glob("**/*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")


def run_cli(
    *args: str, timeout: float = 120, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`collector ARGS` as a user runs it; ``env`` is added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    """Collectors started in a test; any left running are killed at the end."""
    started: list[Collector] = []
    yield started
    for c in started:
        if c.alive():
            c.proc.kill()
            c.proc.wait()
