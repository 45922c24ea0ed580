"""Runtime parts that need no process: the bandwidth cap and the pipeline's determinism."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collector.config import Component
from collector.errors import TransientSinkError
from collector.plugin import BatchConfig, Context, Counters, Sink, SinkConfig
from collector.runtime import delivery
from collector.runtime.checkpoint import Checkpoint, CheckpointStore
from collector.runtime.log import Entry, Kind
from collector.runtime.pipeline import Pipeline, Route
from collector.runtime.spool import Spool
from collector.runtime.telemetry import SinkState, Telemetry
from collector.transforms.window import WindowConfig, WindowTransform


def test_token_bucket_paces_to_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"t": 100.0}
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock["t"] += seconds

    monkeypatch.setattr(delivery.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(delivery.asyncio, "sleep", fake_sleep)

    async def go() -> None:
        bucket = delivery.TokenBucket(2000)
        for _ in range(10):
            await bucket.take(1000)

    asyncio.run(go())
    # 10,000 bytes at 2,000 B/s with a 2,000-byte burst: 4 seconds of waiting in total
    assert sum(slept) == pytest.approx(4.0)


def _entries(n: int) -> list[Entry]:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        df = pl.DataFrame({
            "ts": [t0 + timedelta(seconds=7 * i + k) for k in range(3)],
            "device": ["d"] * 3, "source": ["s"] * 3, "metric": ["m"] * 3,
            "value": [float(i * 3 + k) for k in range(3)], "unit": [None] * 3,
        }, schema_overrides={"ts": pl.Datetime("us", "UTC"), "unit": pl.String})
        wall = 1_700_000_000_000_000 + i * 400_000  # 0.4 s apart
        out.append(Entry(i, Kind.DATA, wall, df))
        if i % 5 == 4:
            out.append(Entry(i, Kind.TICK, wall + 1_500_000, None))
    return [Entry(k, e.kind, e.wall_us, e.frame) for k, e in enumerate(out)]


def _pipeline() -> Pipeline:
    ctx = Context(device="d", component="window", data_dir=__import__("pathlib").Path("."))
    window = WindowTransform(WindowConfig(type="window", every="30s"), ctx)
    return Pipeline([window], [Route("lake", None, BatchConfig(max_rows=4, max_age="1s")),
                               Route("hot", "max > 40", BatchConfig(max_rows=100))])


def _run(p: Pipeline, entries: list[Entry]) -> list[tuple[str, str, list]]:
    return [(b.sink, b.batch_id, b.frame.to_dicts()) for e in entries for b in p.process(e)]


def _roundtrip(p: Pipeline, store: CheckpointStore, fingerprint: str = "fp") -> Checkpoint:
    """A checkpoint as the runtime writes it, read back from its bytes."""
    return Checkpoint.from_bytes(p.checkpoint(fingerprint, store).to_bytes())


def test_replay_from_any_checkpoint_cuts_identical_batches(tmp_path: Path) -> None:
    entries = [*_entries(40), Entry(1000, Kind.FLUSH, 1800000000000000, None)]
    reference = _run(_pipeline(), entries)
    assert len({b[1] for b in reference if b[0] == "lake"}) > 3
    assert any(b[0] == "hot" for b in reference)
    for cut in (1, 7, 20, 33):
        store = CheckpointStore(tmp_path / f"state-{cut}")
        first = _pipeline()
        before = _run(first, entries[:cut])
        cp = _roundtrip(first, store)
        second = _pipeline()
        assert second.restore(cp, "fp", store)
        after = _run(second, [e for e in entries if e.offset > second.offset])
        assert before + after == reference, f"diverged after a checkpoint at entry {cut}"


def test_changed_chain_keeps_offset_but_not_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    p = _pipeline()
    _run(p, _entries(3))
    fresh = _pipeline()
    assert not fresh.restore(_roundtrip(p, store, "old"), "new", store)
    assert fresh.offset == p.offset
    assert fresh.transforms[0].open == {}


def test_checkpoint_size_stays_flat_while_a_batch_waits(tmp_path: Path) -> None:
    """A 5-minute batch of many rows: each checkpoint writes the new rows once, not all."""
    store = CheckpointStore(tmp_path)
    p = Pipeline([], [Route("slow", None, BatchConfig(max_age="5m"), "dev-0000abcd")])
    sizes, pending_sizes = [], []
    for e in _entries(60):
        assert p.process(e) == []
        cp = p.checkpoint("fp", store)
        sizes.append(len(cp.to_bytes()))
        pending_sizes.append(sum(f.stat().st_size for f in store.pending_dir.glob("*.arrows")))
    assert max(sizes) - min(sizes) < 64  # the header grows by digits only
    growth = [b - a for a, b in itertools.pairwise(pending_sizes)]
    assert max(growth) < 3 * min(g for g in growth if g)  # each frame appended once
    restored = Pipeline([], [Route("slow", None, BatchConfig(max_age="5m"), "dev-0000abcd")])
    restored.restore(Checkpoint.from_bytes(cp.to_bytes()), "fp", store)
    assert restored.routes[0].pending.rows == p.routes[0].pending.rows
    flushed = restored.process(Entry(999, Kind.FLUSH, 1_800_000_000_000_000, None))
    assert flushed[0].batch_id.startswith("dev-0000abcd-000000000000-")
    assert flushed[0].frame.height == p.routes[0].pending.rows


# -- delivery: hung calls are visible, repeated errors are counted, not repeated -------------


class _Endpoint:
    """A real TCP server that first accepts and never answers, then (``answer()``) answers.

    It records the batch ids it acknowledged: what "landed" at the destination.
    """

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.answering = threading.Event()
        self.held: list[socket.socket] = []
        self.landed: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self.answering.is_set():
                self.held.append(conn)  # accepted, never answered
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: Any) -> None:
        with conn:
            line = conn.makefile("rb").readline()
            self.landed.append(line.decode().strip())
            conn.sendall(b"ok\n")

    def answer(self) -> None:
        self.answering.set()
        for conn in self.held:  # the silent connections go away, as a restarted server's would
            conn.close()

    def close(self) -> None:
        self.sock.close()


class _LineSink(Sink):
    """Sends the batch id over TCP and waits for ``ok``: a sink with a silent server."""

    deadline = 600.0  # far beyond the test: visibility must not wait for the deadline

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.config.port)
        try:
            writer.write(batch_id.encode() + b"\n")
            await writer.drain()
            if await reader.readline() != b"ok\n":
                raise TransientSinkError("connection closed without an answer")
        finally:
            writer.close()


class _LineConfig(SinkConfig):
    type: str = "line"
    port: int = 0


async def test_a_silent_endpoint_turns_health_red_while_the_call_waits(tmp_path: Path) -> None:
    endpoint = _Endpoint()
    cfg = _LineConfig.model_validate(
        {"name": "line", "port": endpoint.port,
         "spool": {"retry_base": "50ms", "retry_cap": "200ms"}})
    counters = Counters()
    telemetry = Telemetry(counters, tmp_path, unhealthy_after=0.3)
    state = telemetry.sinks["line"] = SinkState()
    spool = Spool(tmp_path / "spool" / "line", cfg.spool, "line", counters)
    sink = _LineSink(cfg, Context(device="d", component="line", data_dir=tmp_path))
    worker = delivery.SinkWorker(
        Component(kind="sink", index=0, cls=_LineSink, config=cfg), sink, spool, state,
        counters, shutdown_timeout=5)
    table = pl.DataFrame({"value": [1.0, 2.0]})
    for n in range(3):
        spool.put(table, f"edge-01-1a2b3c4d-{n:012d}-{n:012d}")
    stop = False
    task = asyncio.create_task(worker.run(lambda: stop))
    try:
        async def until(cond: Any, what: str) -> None:
            for _ in range(300):
                if cond():
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}")

        def red() -> bool:
            ok, detail = telemetry.health()
            return not ok and "no answer" in str(detail["failing"].get("line", {}))

        await until(red, "/health to say no answer")
        status = telemetry.status()["sinks"]["line"]
        assert status["up"] is False and "no answer for" in status["last_error"]
        assert state.failing_since is None  # nothing failed yet: it is only silent
        assert spool.backlog_rows == 6  # the backlog waits in the spool
        assert endpoint.landed == []

        endpoint.answer()
        await until(lambda: spool.backlog_rows == 0, "the backlog to drain")
        assert sorted(endpoint.landed) == [f"edge-01-1a2b3c4d-{n:012d}-{n:012d}" for n in range(3)]
        assert telemetry.health()[0]
        assert telemetry.status()["sinks"]["line"]["up"] is True
    finally:
        stop = True
        endpoint.answer()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            endpoint.close()


async def test_a_call_past_its_deadline_is_a_transient_failure(tmp_path: Path) -> None:
    """The deadline cancels the silent call; the batch stays for the next try."""
    endpoint = _Endpoint()
    cfg = _LineConfig.model_validate({"name": "line", "port": endpoint.port})
    sink = _LineSink(cfg, Context(device="d", component="line", data_dir=tmp_path))
    sink.deadline = 0.3  # type: ignore[misc]
    counters = Counters()
    spool = Spool(tmp_path / "spool" / "line", cfg.spool, "line", counters)
    state = SinkState()
    worker = delivery.SinkWorker(
        Component(kind="sink", index=0, cls=_LineSink, config=cfg), sink, spool, state,
        counters, shutdown_timeout=5)
    spool.put(pl.DataFrame({"value": [1.0]}), "b")
    item = spool.claim()
    assert item is not None
    await worker._send(item)
    assert state.last_error is not None and "no answer for 0 s" in state.last_error
    assert state.inflight_since is None and state.failing_since is not None
    assert spool.backlog_rows == 1 and endpoint.landed == []
    endpoint.close()


def test_repeated_errors_are_logged_once_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    repeated = delivery.RepeatedLog(logging.getLogger("collector.test"), every=3600)
    with caplog.at_level(logging.WARNING, logger="collector.test"):
        for n in range(50):  # a new batch id every time, same error
            repeated(logging.WARNING, f"sink s3: batch {n:012d}: connection refused; retry in "
                                      f"{n / 7:.1f}s")
        repeated(logging.ERROR, "sink s3: something else")
        repeated(logging.ERROR, "sink s3: something else")
        repeated.flush(" before it recovered")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "sink s3: batch 000000000000: connection refused; retry in 0.0s",
        "the last error repeated 49 more times",
        "sink s3: something else",
        "the last error repeated 1 more times before it recovered",
    ]
