"""Runtime parts that need no process: the bandwidth cap and the pipeline's determinism."""

from __future__ import annotations

import asyncio
import pickle
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from collector.plugin import BatchConfig, Context
from collector.runtime import delivery
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


def test_replay_from_any_checkpoint_cuts_identical_batches() -> None:
    entries = [*_entries(40), Entry(1000, Kind.FLUSH, 1800000000000000, None)]
    reference = _run(_pipeline(), entries)
    assert len({b[1] for b in reference if b[0] == "lake"}) > 3
    assert any(b[0] == "hot" for b in reference)
    for cut in (1, 7, 20, 33):
        first = _pipeline()
        before = _run(first, entries[:cut])
        blob = first.snapshot("fp")
        second = _pipeline()
        ctx = [t.ctx for t in second.transforms]
        cfg = [t.config for t in second.transforms]
        assert second.restore(blob, "fp", ctx, cfg)
        after = _run(second, [e for e in entries if e.offset > second.offset])
        assert before + after == reference, f"diverged after a checkpoint at entry {cut}"


def test_changed_chain_keeps_offset_but_not_state() -> None:
    p = _pipeline()
    _run(p, _entries(3))
    fresh = _pipeline()
    assert not fresh.restore(p.snapshot("old"), "new", [], [])
    assert fresh.offset == p.offset
    assert pickle.loads(p.snapshot("x"))["offset"] == p.offset
