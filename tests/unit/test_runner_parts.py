"""Runtime parts that need no process: the bandwidth cap and the pipeline's determinism."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from collector.plugin import BatchConfig, Context
from collector.runtime import delivery
from collector.runtime.checkpoint import Checkpoint, CheckpointStore
from collector.runtime.log import Entry, Kind
from collector.runtime.pipeline import Pipeline, Route
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
        out.append(Entry(i, Kind.DATA, wall, df.to_arrow()))
        if i % 5 == 4:
            out.append(Entry(i, Kind.TICK, wall + 1_500_000, None))
    return [Entry(k, e.kind, e.wall_us, e.table) for k, e in enumerate(out)]


def _pipeline() -> Pipeline:
    ctx = Context(device="d", component="window", data_dir=__import__("pathlib").Path("."))
    window = WindowTransform(WindowConfig(type="window", every="30s"), ctx)
    return Pipeline([window], [Route("lake", None, BatchConfig(max_rows=4, max_age="1s")),
                               Route("hot", "max > 40", BatchConfig(max_rows=100))])


def _run(p: Pipeline, entries: list[Entry]) -> list[tuple[str, str, list]]:
    return [(b.sink, b.batch_id, b.table.to_pylist()) for e in entries for b in p.process(e)]


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
    assert flushed[0].table.num_rows == p.routes[0].pending.rows
