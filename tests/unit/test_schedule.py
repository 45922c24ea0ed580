"""Scheduling of polled sources: cron fires, jitter spreads a fleet, skipped ticks are counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from collector.plugin import Source
from collector.runtime.runner import FINITE_SOURCE_ATTEMPTS, Runtime
from collector.testing import load_config, run_once


def _jobs(tmp_path: Path, source: dict[str, Any]) -> dict[str, Any]:
    cfg = load_config(
        {
            "device": "d",
            "telemetry": {"enabled": False},
            "sources": [{"name": "s", "type": "simulated", **source}],
            "sinks": [{"type": "console"}],
        }
    )
    rt = Runtime(cfg, tmp_path)

    async def schedule() -> dict[str, Any]:
        tasks: list[asyncio.Task[Any]] = []
        scheduler = rt._schedule([src for _, src in rt.sources], tasks)
        try:
            return {j.id: j for j in scheduler.get_jobs()}
        finally:
            scheduler.shutdown(wait=False)

    return asyncio.run(schedule())


def test_a_cron_source_is_scheduled_not_paused(tmp_path: Path) -> None:
    job = _jobs(tmp_path, {"cron": "* * * * *"})["s"]
    assert job.next_run_time is not None  # None is APScheduler's "paused": it never fired
    now = datetime.now(UTC)
    assert now < job.next_run_time <= now + timedelta(seconds=61)


def test_jitter_reaches_the_trigger(tmp_path: Path) -> None:
    assert _jobs(tmp_path, {"every": "5s", "jitter": "2s"})["s"].trigger.jitter == 2
    assert _jobs(tmp_path, {"cron": "*/5 * * * *", "jitter": "30s"})["s"].trigger.jitter == 30
    assert _jobs(tmp_path, {"every": "5s"})["s"].trigger.jitter is None


class FailingReplay(Source):
    """A finite stream that fails every time, like a replay of a file it cannot read."""

    long_lived = True
    finite = True
    attempts: ClassVar[int] = 0

    async def stream(self) -> AsyncIterator[Any]:
        type(self).attempts += 1
        raise ValueError("duplicate column name 'value'")
        yield  # pragma: no cover - makes this an async generator


def test_a_finite_source_that_keeps_failing_ends_once_with_exit_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = {
        "device": "d",
        "sources": [{"name": "r", "type": "tests.unit.test_schedule:FailingReplay"}],
        "sinks": [{"type": "console"}],
    }
    assert run_once(config, tmp_path) == 1
    assert FailingReplay.attempts == FINITE_SOURCE_ATTEMPTS
    assert "source r gave up: duplicate column name 'value'" in caplog.text


class AlwaysFailing(Source):
    """A polled device that is offline: every read fails the same way."""

    reads: ClassVar[int] = 0

    def read(self) -> Any:
        type(self).reads += 1
        raise OSError("[Errno 113] No route to host 10.0.0.7")


def test_a_source_failing_every_tick_is_logged_once_not_every_tick(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(
        {
            "device": "d",
            "telemetry": {"enabled": False},
            "sources": [
                {"name": "plc", "type": "tests.unit.test_schedule:AlwaysFailing", "every": "50ms"}
            ],
            "sinks": [{"type": "console"}],
        }
    )
    rt = Runtime(cfg, tmp_path)
    asyncio.run(rt.run(duration=1.5))
    lines = [r for r in caplog.records if "No route to host" in r.getMessage()]
    assert AlwaysFailing.reads >= 5
    assert len(lines) == 1
    assert rt.counters.get("source_errors_total", source="plc") == AlwaysFailing.reads


def test_a_stop_waits_for_a_tick_that_starts_while_it_waits(tmp_path: Path) -> None:
    """The interleaving that cancelled a tick mid-read at a stop: one tick has just finished
    (its bookkeeping still pending) and APScheduler has handed the next one to the loop. The
    stop must wait for that one too, or the scheduler's shutdown cancels it and its readings
    are lost."""
    cfg = load_config(
        {
            "device": "d",
            "telemetry": {"enabled": False},
            "sources": [{"name": "s", "type": "simulated", "every": "1s"}],
            "sinks": [{"type": "console"}],
        }
    )
    rt = Runtime(cfg, tmp_path)
    logged: list[str] = []

    async def tick(name: str, read_s: float) -> None:  # registers as Runtime._tick does
        task = asyncio.current_task()
        assert task is not None
        rt._ticks.add(task)
        task.add_done_callback(rt._ticks.discard)
        if read_s:
            await asyncio.sleep(read_s)
        logged.append(name)

    async def stop() -> asyncio.Task[None]:
        done = asyncio.create_task(tick("first", 0))
        await asyncio.sleep(0)  # it finishes; dropping it from the set is still queued
        assert done.done() and rt._ticks == {done}
        handed = asyncio.create_task(tick("second", 0.05))  # not started yet
        await rt._let_ticks_finish(5)
        return handed

    handed = asyncio.run(stop())
    assert logged == ["first", "second"] and not handed.cancelled()
