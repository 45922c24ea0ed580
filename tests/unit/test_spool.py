"""Spool: durable queue per sink, bounds and policies, dead letters, restart."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from collector.plugin import Counters, SpoolConfig
from collector.runtime.spool import Spool


def rows(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "value": [float(i) for i in range(start, start + n)],
            "record_id": [f"b:{i}" for i in range(start, start + n)],
        }
    )


def file_size(tmp_path: Path, n: int) -> int:
    """Bytes one spooled batch of ``n`` rows takes on disk (files are compressed)."""
    probe = Spool(tmp_path / "probe", SpoolConfig(), "probe")
    probe.put(rows(n), "000000000000-000000000000")
    return probe.backlog_bytes


def make(tmp_path: Path, **kw: object) -> tuple[Spool, Counters]:
    c = Counters()
    return Spool(tmp_path / "s", SpoolConfig(**kw), "out", c, data_dir=tmp_path), c


def test_oldest_first_and_done(tmp_path: Path) -> None:
    sp, c = make(tmp_path)
    for i in (2, 0, 1):
        sp.put(rows(3, i * 3), f"{i:012d}-{i:012d}")
    got = []
    while (item := sp.claim()) is not None:
        got.append(Spool.read(item).get_column("value")[0])
        sp.done(item)
    assert got == [0.0, 3.0, 6.0]
    assert sp.backlog_rows == 0
    assert c.get("delivered_rows_total", sink="out") == 9


def test_inflight_returns_to_ready_on_restart(tmp_path: Path) -> None:
    sp, _ = make(tmp_path)
    sp.put(rows(2), "000000000000-000000000001")
    item = sp.claim()
    assert item is not None and item.path.parent.name == "inflight"
    sp2, _ = make(tmp_path)  # a crash while sending
    assert sp2.backlog_rows == 2
    again = sp2.claim()
    assert again is not None and Spool.read(again).height == 2


def test_replayed_batch_replaces_its_file(tmp_path: Path) -> None:
    sp, _ = make(tmp_path)
    sp.put(rows(2), "000000000000-000000000001")
    sp.put(rows(2), "000000000000-000000000001")
    assert len(list((tmp_path / "s").glob("*.arrow"))) == 1
    assert sp.backlog_rows == 2


def test_partial_replace_keeps_only_retry_rows(tmp_path: Path) -> None:
    sp, _ = make(tmp_path)
    sp.put(rows(5), "000000000000-000000000001")
    item = sp.claim()
    assert item is not None
    sp.replace(item, rows(5).slice(3, 2))
    again = sp.claim()
    assert again is not None
    assert Spool.read(again).get_column("value").to_list() == [3.0, 4.0]
    assert again.batch_id == item.batch_id


def test_drop_oldest_counts_dropped_rows(tmp_path: Path) -> None:
    one = file_size(tmp_path, 100)
    sp, c = make(tmp_path, max_bytes=int(one * 2.5), when_full="drop_oldest")
    for i in range(6):
        assert sp.put(rows(100, i * 100), f"{i:012d}-{i:012d}") == "ok"
    kept = []
    while (item := sp.claim()) is not None:
        kept.extend(Spool.read(item).get_column("value").to_list())
        sp.done(item)
    dropped = c.get("dropped_rows_total", sink="out", reason="spool_full")
    assert dropped == 600 - len(kept) and dropped > 0
    assert kept == [float(v) for v in range(600 - len(kept), 600)]  # the newest survive


def test_drop_newest_refuses_new_batches(tmp_path: Path) -> None:
    one = file_size(tmp_path, 100)
    sp, c = make(tmp_path, max_bytes=int(one * 1.5), when_full="drop_newest")
    assert sp.put(rows(100), "000000000000-000000000000") == "ok"
    assert sp.put(rows(100, 100), "000000000001-000000000001") == "dropped"
    assert c.get("dropped_rows_total", sink="out", reason="spool_full") == 100
    assert sp.backlog_rows == 100


def test_ttl_expires_old_batches(tmp_path: Path) -> None:
    sp, c = make(tmp_path, ttl="1h")
    sp.put(rows(4), "000000000000-000000000000", created_ms=0)
    sp.put(rows(3), "000000000001-000000000001")
    assert sp.expire() == 4
    assert c.get("dropped_rows_total", sink="out", reason="ttl") == 4
    assert sp.backlog_rows == 3


def test_dead_letter_parquet_has_reason_and_sink(tmp_path: Path) -> None:
    sp, c = make(tmp_path)
    path = sp.dead_letter(rows(2), ["mapper_parsing_exception", "bad"], "b1")
    df = pl.read_parquet(path)
    assert df["dead_letter_reason"].to_list() == ["mapper_parsing_exception", "bad"]
    assert df["dead_letter_sink"].to_list() == ["out", "out"]
    assert df["value"].to_list() == [0.0, 1.0]
    assert c.get("dead_letter_rows_total", sink="out") == 2


def test_garbage_file_is_quarantined_counted_and_skipped(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "000000000000-000000000000.arrow").write_bytes(b"garbage")
    sp, c = make(tmp_path)
    sp.put(rows(3), "000000000001-000000000001")
    item = sp.claim()
    assert item is not None and Spool.read(item).get_column("value").to_list() == [0.0, 1.0, 2.0]
    assert not list((tmp_path / "s").glob("000000000000-*"))
    kept = list((tmp_path / "quarantine").glob("*.bin"))
    assert [p.read_bytes() for p in kept] == [b"garbage"]
    assert c.get("corrupt_records_total", file="spool/out/000000000000-000000000000.arrow") == 1


def test_truncated_oldest_file_costs_only_its_own_rows(tmp_path: Path) -> None:
    sp, _ = make(tmp_path)
    for i in range(4):
        sp.put(rows(100, i * 100), f"{i:012d}-{i:012d}")
    oldest = tmp_path / "s" / f"{0:012d}-{0:012d}.arrow"
    oldest.write_bytes(oldest.read_bytes()[: oldest.stat().st_size // 2])
    sp2, c2 = make(tmp_path)
    got = []
    while (item := sp2.claim()) is not None:
        got.extend(Spool.read(item).get_column("value").to_list())
        sp2.done(item)
    assert got == [float(v) for v in range(100, 400)]
    assert c2.get("dropped_rows_total", sink="out", reason="corrupt") == 100
    spooled = c2.get("spooled_rows_total", sink="out")
    assert spooled == c2.get("delivered_rows_total", sink="out") + 100
    assert len(list((tmp_path / "quarantine").glob("*.json"))) == 1


def test_block_holds_batches_back_and_never_passes_max_bytes(tmp_path: Path) -> None:
    sp, c = make(tmp_path)
    sp.put(rows(100), "000000000000-000000000000")
    size = sp.backlog_bytes
    sp.settings.max_bytes = int(size * 1.5)
    assert sp.put(rows(100, 100), "000000000001-000000000001", wait_if_full=True) == "full"
    assert sp.backlog_rows == 100 and sp.backlog_bytes <= sp.settings.max_bytes
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s").glob("*.arrow"))
    assert on_disk == sp.backlog_bytes
    assert c.get("dropped_rows_total", sink="out", reason="spool_full") == 0


def test_partial_retry_rows_survive_a_failed_rewrite(tmp_path: Path, monkeypatch) -> None:
    import collector.runtime.spool as spool_module

    sp, _ = make(tmp_path)
    sp.put(rows(5), "000000000000-000000000001")
    item = sp.claim()
    assert item is not None

    def disk_full(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module, "atomic_write", disk_full)
    with pytest.raises(OSError):
        sp.replace(item, rows(5).slice(3, 2))
    monkeypatch.undo()
    again = Spool(tmp_path / "s", SpoolConfig(), "out")  # even after a restart
    assert again.backlog_rows == 5
