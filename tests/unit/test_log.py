"""Device log: durable appends, torn-tail recovery, segment truncation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import polars as pl
import pytest

from collector.plugin import Counters
from collector.runtime.log import RECORD_MAGIC, DeviceLog, Kind


def table(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame({"value": [float(i) for i in range(start, start + n)]})


def test_append_and_read_back(tmp_path: Path) -> None:
    log = DeviceLog(tmp_path)
    offsets = [log.append(table(3, i * 3)) for i in range(5)]
    log.append(None, Kind.TICK)
    assert offsets == [0, 1, 2, 3, 4]
    entries = list(log.read(2))
    assert [e.offset for e in entries] == [2, 3, 4, 5]
    assert entries[0].frame.get_column("value").to_list() == [6.0, 7.0, 8.0]
    assert entries[-1].kind == Kind.TICK and entries[-1].frame is None
    assert entries[0].wall_us <= entries[-1].wall_us


def test_reopen_continues_offsets(tmp_path: Path) -> None:
    log = DeviceLog(tmp_path)
    for i in range(3):
        log.append(table(1, i))
    log.close()
    log2 = DeviceLog(tmp_path)
    assert log2.next_offset == 3
    assert log2.append(table(1, 9)) == 3
    assert [e.frame.get_column("value")[0] for e in log2.read(0)] == [0.0, 1.0, 2.0, 9.0]


def test_torn_tail_is_cut_on_open(tmp_path: Path) -> None:
    log = DeviceLog(tmp_path)
    log.append(table(2))
    log.append(table(2, 2))
    log.close()
    seg = next(tmp_path.glob("*.log"))
    data = seg.read_bytes()
    seg.write_bytes(data[:-5])  # a power cut in the middle of the last record
    log2 = DeviceLog(tmp_path)
    assert log2.next_offset == 1
    assert [e.offset for e in log2.read(0)] == [0]
    assert log2.append(table(1)) == 1
    assert [e.offset for e in DeviceLog(tmp_path).read(0)] == [0, 1]


def test_damaged_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    log = DeviceLog(tmp_path)
    log.append(table(2))
    log.append(table(2))
    log.close()
    seg = next(tmp_path.glob("*.log"))
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF  # flipped bit in the last record: crc mismatch
    seg.write_bytes(bytes(data))
    assert DeviceLog(tmp_path).next_offset == 1


def test_segments_roll_and_truncate(tmp_path: Path) -> None:
    log = DeviceLog(tmp_path, segment_bytes=2000)
    for i in range(40):
        log.append(table(20, i))
    segments = sorted(tmp_path.glob("*.log"))
    assert len(segments) > 3
    removed = log.truncate_before(30)
    assert removed >= 2
    remaining = [e.offset for e in log.read(0)]
    assert remaining[-1] == 39 and 30 in remaining and remaining[0] <= 30
    assert remaining == list(range(remaining[0], 40))


def test_failed_write_leaves_no_half_record(tmp_path: Path, monkeypatch) -> None:
    log = DeviceLog(tmp_path)
    log.append(table(2))
    real_write = log._fh.write
    calls = {"n": 0}

    def flaky_write(data):  # the disk fills up halfway through a record
        calls["n"] += 1
        if calls["n"] == 1:
            real_write(bytes(data)[:10])
            raise OSError(28, "No space left on device")
        return real_write(data)

    monkeypatch.setattr(log._fh, "write", flaky_write, raising=False)
    with pytest.raises(OSError):
        log.append(table(2, 2))
    monkeypatch.undo()
    assert log.append(table(2, 4)) == 1  # the failed append took no offset
    log.close()
    values = [e.frame.get_column("value").to_list() for e in DeviceLog(tmp_path).read(0)]
    assert values == [[0.0, 1.0], [4.0, 5.0]]


def test_consecutive_reads_resume_across_segments(tmp_path: Path) -> None:
    log = DeviceLog(tmp_path, segment_bytes=1500)
    seen: list[float] = []
    nxt = 0
    for i in range(30):
        log.append(table(2, i * 2))
        if i % 4 == 3:  # the pipeline reads what is new, every now and then
            for e in log.read(nxt):
                seen.extend(e.frame.get_column("value").to_list())
                nxt = e.offset + 1
    seen.extend(v for e in log.read(nxt) for v in e.frame.get_column("value").to_list())
    assert len(list(tmp_path.glob("*.log"))) > 2
    assert seen == [float(v) for v in range(60)]


def test_skip_to_continues_numbering_after_a_lost_tail(tmp_path: Path) -> None:
    log = DeviceLog(tmp_path)
    for i in range(3):
        log.append(table(1, i))
    log.skip_to(10)  # the checkpoint said 9 was processed, the log only had 0..2
    assert log.append(table(1, 7)) == 10
    log.close()
    reopened = DeviceLog(tmp_path)
    assert reopened.next_offset == 11
    assert [e.offset for e in reopened.read(0)] == [0, 1, 2, 10]
    assert [e.offset for e in reopened.read(10)] == [10]


def _values(folder: Path) -> list[float]:
    return [v for e in DeviceLog(folder).read(0) for v in e.frame.get_column("value").to_list()]


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_flipped_byte_in_the_middle_costs_one_record(tmp_path: Path, where: float) -> None:
    log = DeviceLog(tmp_path / "log", counters=(c := Counters()))
    for i in range(76):
        log.append(table(2, i * 2))
    log.close()
    seg = next((tmp_path / "log").glob("*.log"))
    data = bytearray(seg.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    seg.write_bytes(bytes(data))
    reopened = DeviceLog(tmp_path / "log", counters=c)
    assert reopened.next_offset == 76  # offsets go on after the last good record
    got = _values(tmp_path / "log")
    assert len(got) == 150 and set(got) <= {float(v) for v in range(152)}
    assert got == sorted(got)
    kept = list((tmp_path / "quarantine").glob("*.json"))
    assert len(kept) == 1 and "lost (1 record(s))" in kept[0].read_text()
    assert sum(v for (name, _), v in c.snapshot() if name == "corrupt_records_total") == 1
    assert reopened.append(table(1, 999)) == 76
    assert _values(tmp_path / "log")[-1] == 999.0


def test_garbage_between_records_is_stepped_over(tmp_path: Path) -> None:
    log = DeviceLog(tmp_path / "log")
    for i in range(10):
        log.append(table(1, i))
    log.close()
    seg = next((tmp_path / "log").glob("*.log"))
    data = seg.read_bytes()
    cut = data.index(RECORD_MAGIC, len(data) // 2)
    seg.write_bytes(data[:cut] + b"\x00garbage" * 50 + RECORD_MAGIC + b"junk" + data[cut:])
    assert _values(tmp_path / "log") == [float(v) for v in range(10)]
    assert len(list((tmp_path / "quarantine").glob("*.bin"))) == 1


def test_damage_found_while_running_is_reported_once(tmp_path: Path) -> None:
    c = Counters()
    log = DeviceLog(tmp_path / "log", counters=c)
    for i in range(6):
        log.append(table(1, i))
    seg = next((tmp_path / "log").glob("*.log"))
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x01  # after the open-time check
    seg.write_bytes(bytes(data))
    first = [e.offset for e in log.read(0)]
    second = [e.offset for e in log.read(0)]
    assert first == second and len(first) == 5
    assert sum(v for (name, _), v in c.snapshot() if name == "corrupt_records_total") == 1


def test_first_format_segments_are_still_read(tmp_path: Path) -> None:
    """A data dir of the previous version: records without a magic, no segment header."""
    import struct
    import zlib

    from collector.runtime.log import encode_frame

    folder = tmp_path / "log"
    folder.mkdir()
    out = b""
    for i in range(3):
        payload = encode_frame(table(1, i))
        body = struct.pack("<QqB", i, 1_700_000_000_000_000, 0) + payload
        out += struct.pack("<II", len(payload), zlib.crc32(body)) + body
    (folder / f"{0:020d}.log").write_bytes(out)
    log = DeviceLog(folder)
    assert log.append(table(1, 3)) == 3
    assert _values(folder) == [0.0, 1.0, 2.0, 3.0]


def test_roll_lets_a_processed_segment_go_before_it_is_full(tmp_path: Path) -> None:
    log = DeviceLog(tmp_path)
    for i in range(5):
        log.append(table(1, i))
    log.roll()
    log.roll()  # an empty segment is not rolled again
    assert len(list(tmp_path.glob("*.log"))) == 2
    assert log.truncate_before(5) == 1
    assert log.append(table(1, 5)) == 5
    assert [e.offset for e in DeviceLog(tmp_path).read(0)] == [5]


def test_a_read_racing_appends_reports_no_damage_and_skips_nothing(tmp_path: Path) -> None:
    """The pipeline reads the log while sources append to it. A read can catch an append half
    done (the kernel makes a write visible page by page); that is no damage: nothing is set
    aside or counted as corrupt, and every record is read once, in order."""
    c = Counters()
    log = DeviceLog(tmp_path / "log", counters=c, fsync="interval", fsync_interval=3600)
    real_write = log._fh.write

    def visible_in_two_steps(data):  # widen the window a reader can see a half record in
        view = memoryview(data)
        half = len(view) // 2
        done = real_write(view[:half])
        time.sleep(0.0002)
        return done + real_write(view[half:])

    log._fh.write = visible_in_two_steps
    n = 2000
    writer = threading.Thread(target=lambda: [log.append(table(30, i * 30)) for i in range(n)])
    writer.start()
    seen: list[int] = []
    while len(seen) < n and (writer.is_alive() or log.next_offset > len(seen)):
        start = seen[-1] + 1 if seen else 0
        seen += [e.offset for e in log.read(start)]
    writer.join()
    assert seen == list(range(n))
    assert not (tmp_path / "quarantine").exists(), list((tmp_path / "quarantine").iterdir())
    assert not [v for (name, _), v in c.snapshot() if name == "corrupt_records_total"]
