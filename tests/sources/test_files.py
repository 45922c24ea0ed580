"""The `files` source and the blob store: real files in a real folder, the real runtime.

Files are dropped into a watched folder with controlled modification times, so "still being
written" (younger than `settle`) and "settled" are exact, not timing luck.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collector.plugin import Context
from collector.runtime import blobs
from collector.runtime.blobs import BlobsConfig, BlobStore, BlobStoreFull
from collector.sources.files import FilesConfig, FilesSource
from collector.testing import ListSink, load_config, run_once


def png(seed: int, size: int = 64) -> bytes:
    """A real, valid PNG (gray, ``size`` x 1 pixels) whose content depends on ``seed``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    raw = b"\x00" + bytes((seed * 7 + i) % 256 for i in range(size))
    ihdr = struct.pack(">IIBBBBB", size, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def drop(folder: Path, name: str, data: bytes, age: float = 60.0) -> Path:
    """Write a file as a camera app would, with its mtime ``age`` seconds in the past."""
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    t = time.time() - age
    os.utime(p, (t, t))
    return p


@pytest.fixture(autouse=True)
def _fresh_stores() -> None:
    blobs._STORES.clear()


@pytest.fixture
def cam(tmp_path: Path) -> Path:
    folder = tmp_path / "camera"
    folder.mkdir()
    return folder


def source(tmp_path: Path, cam: Path, **kw: Any) -> FilesSource:
    cfg = FilesConfig(type="files", name="camera", path=str(cam), settle="5s", **kw)
    ctx = Context(device="edge-01", component="camera", data_dir=tmp_path / "data")
    src = FilesSource(cfg, ctx)
    return src


async def opened(src: FilesSource) -> FilesSource:
    await src.open()
    return src


def dead_letters(tmp_path: Path) -> list[dict[str, Any]]:
    f = tmp_path / "data" / "dead-letter" / "camera.ndjson"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines()]


async def test_each_settled_file_is_one_row_with_its_blob(tmp_path: Path, cam: Path) -> None:
    a = drop(cam, "a.png", png(1), age=30)
    drop(cam, "b.png", png(2), age=1)  # still being written (younger than settle: 5s)
    src = await opened(source(tmp_path, cam))
    rows = src.read()
    assert rows.columns == [
        "ts", "device", "source", "metric", "value", "unit",
        "path", "file", "bytes", "sha256", "content_type",
    ]
    assert rows.schema["bytes"] == pl.Int64
    assert rows.height == 1
    row = rows.row(0, named=True)
    data = png(1)
    assert row["file"] == "a.png"
    assert row["metric"] == "image" and row["value"] is None and row["unit"] is None
    assert row["bytes"] == len(data)
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert row["content_type"] == "image/png"
    blob = Path(row["path"])
    assert blob.is_absolute()
    assert blob.parent == (tmp_path / "data" / "blobs").resolve()
    assert blob.name == f"{row['sha256']}.png"
    assert blob.read_bytes() == data  # byte for byte
    assert row["ts"] == datetime.fromtimestamp(a.stat().st_mtime_ns / 1e9, UTC)

    assert src.read().height == 0  # b still younger than settle
    t = time.time() - 30
    os.utime(cam / "b.png", (t, t))
    again = src.read()
    assert again.get_column("file").to_list() == ["b.png"]


async def test_keep_never_takes_a_file_twice_even_after_a_restart(
    tmp_path: Path, cam: Path
) -> None:
    for i in range(3):
        drop(cam, f"img{i}.png", png(i), age=60 - i)
    src = await opened(source(tmp_path, cam))
    assert src.read().height == 3
    assert src.read().height == 0
    position = src.position()
    assert position is not None and len(json.dumps(position)) < 200  # bounded: a mark, no list

    restarted = source(tmp_path, cam)
    restarted.resume(json.loads(json.dumps(position)))
    await restarted.open()
    assert restarted.read().height == 0
    drop(cam, "img9.png", png(9), age=10)
    assert restarted.read().get_column("file").to_list() == ["img9.png"]
    # copied in with an old mtime (preserved by `cp -p`) while running: still noticed
    drop(cam, "old.png", png(20), age=3600)
    assert restarted.read().get_column("file").to_list() == ["old.png"]
    assert restarted.read().height == 0
    assert all(p.exists() for p in cam.iterdir())  # keep: the folder is left alone


async def test_delete_acts_once_the_rows_are_logged(tmp_path: Path, cam: Path) -> None:
    drop(cam, "a.png", png(1), age=30)
    drop(cam, "b.png", png(2), age=20)
    src = await opened(source(tmp_path, cam, after="delete"))
    assert src.read().height == 2
    assert {p.name for p in cam.iterdir()} == {"a.png", "b.png"}  # rows not logged yet
    position = src.position()
    assert position is not None
    assert [h[0] for h in position["handed"]] == ["a.png", "b.png"]

    # a kill -9 here: the next start reads the last logged position and finishes the job
    restarted = source(tmp_path, cam, after="delete")
    restarted.resume(position)
    await restarted.open()
    assert restarted.read().height == 0
    assert list(cam.iterdir()) == []
    blob_dir = tmp_path / "data" / "blobs"
    assert len(list(blobs.iter_blob_files(blob_dir))) == 2  # the images live on as blobs


async def test_delete_spares_a_new_file_under_the_same_name(tmp_path: Path, cam: Path) -> None:
    drop(cam, "a.png", png(1), age=30)
    src = await opened(source(tmp_path, cam, after="delete"))
    assert src.read().height == 1
    drop(cam, "a.png", png(5), age=1)  # the camera reused the name meanwhile
    assert src.read().height == 0
    assert (cam / "a.png").read_bytes() == png(5)


async def test_move_moves_to_move_to(tmp_path: Path, cam: Path) -> None:
    done = tmp_path / "done"
    drop(cam, "a.png", png(1), age=30)
    src = await opened(source(tmp_path, cam, after="move", move_to=str(done)))
    src.read()
    src.read()
    assert list(cam.iterdir()) == []
    assert (done / "a.png").read_bytes() == png(1)


async def test_time_from_the_file_name(tmp_path: Path, cam: Path) -> None:
    drop(cam, "IMG_20240301_101530.png", png(1), age=30)
    drop(cam, "no-time-here.png", png(2), age=20)
    src = await opened(
        source(tmp_path, cam, time_pattern=r"(\d{8}_\d{6})", time_format="%Y%m%d_%H%M%S",
               timezone="Europe/Berlin")
    )
    rows = src.read().sort("file")
    ts = dict(zip(rows["file"].to_list(), rows["ts"].to_list(), strict=True))
    assert ts["IMG_20240301_101530.png"] == datetime(2024, 3, 1, 9, 15, 30, tzinfo=UTC)
    mtime = (cam / "no-time-here.png").stat().st_mtime_ns / 1e9
    assert ts["no-time-here.png"] == datetime.fromtimestamp(mtime, UTC)  # falls back


async def test_a_corrupt_file_is_dead_lettered_and_the_others_go_on(
    tmp_path: Path, cam: Path
) -> None:
    drop(cam, "a.png", png(1), age=50)
    drop(cam, "cut.png", png(2)[:-20], age=40)  # upload cut short: no IEND
    drop(cam, "empty.jpg", b"", age=35)
    drop(cam, "fake.jpg", b"\xff\xd8\xff" + b"x" * 100, age=32)  # no EOI
    drop(cam, "b.png", png(3), age=30)
    src = await opened(source(tmp_path, cam, after="delete"))
    rows = src.read()
    assert rows.get_column("file").to_list() == ["a.png", "b.png"]
    dead = {Path(d["raw"]).name: d["reason"] for d in dead_letters(tmp_path)}
    assert dead == {
        "cut.png": "cut.png: truncated PNG (no IEND chunk at the end)",
        "empty.jpg": "empty.jpg: empty file",
        "fake.jpg": "fake.jpg: truncated JPEG (no EOI marker at the end)",
    }
    assert src.ctx.counters.get("source_rejected_total", component="camera") == 3
    src.read()
    # the rejected files stay for inspection and are not dead-lettered again
    assert {p.name for p in cam.iterdir()} == {"cut.png", "empty.jpg", "fake.jpg"}
    assert src.read().height == 0
    assert len(dead_letters(tmp_path)) == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
async def test_an_unreadable_file_is_dead_lettered(tmp_path: Path, cam: Path) -> None:
    drop(cam, "locked.png", png(1), age=50)
    (cam / "locked.png").chmod(0)
    drop(cam, "b.png", png(3), age=30)
    src = await opened(source(tmp_path, cam))
    assert src.read().get_column("file").to_list() == ["b.png"]
    assert "cannot read" in dead_letters(tmp_path)[0]["reason"]


async def test_symlinks_and_hidden_files_are_never_taken(tmp_path: Path, cam: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(1))
    (cam / "link.png").symlink_to(secret)
    drop(cam, ".partial.png", png(2), age=60)
    src = await opened(source(tmp_path, cam))
    assert src.read().height == 0


# -- blob store -----------------------------------------------------------------------------


def test_blob_store_bound_block_and_drop_oldest(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"f{i}.png").write_bytes(png(i, size=1000))
    size = len(png(0, size=1000))
    store = BlobStore(tmp_path / "b", BlobsConfig(max_bytes=3 * size, when_full="block"))
    for i in range(3):
        store.put(tmp_path / f"f{i}.png", hold=False)
    with pytest.raises(BlobStoreFull):
        store.put(tmp_path / "f3.png")
    assert store.total_bytes == 3 * size
    assert store.counters.get("blob_store_full_total") == 1

    oldest = BlobStore(tmp_path / "c", BlobsConfig(max_bytes=3 * size, when_full="drop_oldest"))
    first = oldest.put(tmp_path / "f0.png", hold=False)
    t = time.time() - 100
    os.utime(first.path, (t, t))
    for i in range(1, 4):
        oldest.put(tmp_path / f"f{i}.png", hold=False)
    assert not first.path.exists()
    assert oldest.total_bytes == 3 * size
    assert oldest.counters.get("blobs_deleted_total", reason="full") == 1


def test_sweep_keeps_referenced_held_and_young_blobs(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"f{i}.png").write_bytes(png(i))
    store = BlobStore(tmp_path / "b", BlobsConfig(keep_for="1h"))
    got = [store.put(tmp_path / f"f{i}.png", hold=i == 2) for i in range(4)]
    old = time.time() - 7200
    for b in got[:3]:
        os.utime(b.path, (old, old))
    # 0: referenced; 1: delivered and old; 2: held (row not logged yet); 3: young (keep_for)
    assert store.sweep({got[0].path.name}) == 1
    assert [b.path.exists() for b in got] == [True, False, True, True]
    store.release([got[2].path.name])
    assert store.sweep(set()) == 2
    assert [b.path.exists() for b in got] == [False, False, False, True]
    # untrusted row data never names another file
    assert store.resolve(str(got[3].path)) == got[3].path
    assert store.resolve("/etc/passwd") is None
    assert store.resolve(str(store.folder / ".." / "f0.png")) is None


def test_a_restart_forgets_half_copied_blobs(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / ".0123.tmp").write_bytes(b"half")
    store = BlobStore(folder)
    assert list(folder.iterdir()) == []
    assert store.total_bytes == 0


# -- through the runtime --------------------------------------------------------------------


def config(tmp_path: Path, cam: Path, **blob_settings: Any) -> dict[str, Any]:
    return {
        "device": "edge-01",
        "data_dir": str(tmp_path / "data"),
        "telemetry": {"enabled": False},
        "blobs": {"sweep_every": "10ms", **blob_settings},
        "sources": [
            {"name": "camera", "type": "files", "path": str(cam), "settle": "1s"}
        ],
        "transforms": [{"type": "derive", "columns": {"twice": "bytes * 2"}}],
        "sinks": [
            {"name": "out", "type": "collector.testing:ListSink",
             "where": "sha256 IS NOT NULL AND bytes > 0"}
        ],
    }


def test_rows_keep_their_typed_columns_through_the_runtime(tmp_path: Path, cam: Path) -> None:
    ListSink.reset()
    for i in range(3):
        drop(cam, f"{i}.png", png(i), age=30)
    assert run_once(config(tmp_path, cam), tmp_path / "data") == 0
    rows = ListSink.rows("out").sort("file")
    assert rows.get_column("file").to_list() == ["0.png", "1.png", "2.png"]
    assert rows.schema["bytes"] == pl.Int64
    assert rows.get_column("bytes").to_list() == [len(png(i)) for i in range(3)]
    assert rows.get_column("twice").to_list() == [2 * len(png(i)) for i in range(3)]
    assert rows.get_column("device").unique().to_list() == ["edge-01"]
    # no sink needs the blobs (no blob_column): once the rows passed the pipeline they go
    store = BlobStore(tmp_path / "data" / "blobs")
    assert store.total_bytes == 0


def test_check_knows_the_columns(tmp_path: Path, cam: Path) -> None:
    cfg = load_config(config(tmp_path, cam))
    assert cfg.output is not None
    assert {"path", "file", "bytes", "sha256", "content_type", "twice"} <= set(cfg.output.columns)


class BlobSink(ListSink):
    """A sink that needs the blobs (like `s3` with `blob_column`) and is down until told."""

    blob_column = "path"
    down = True

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        from collector.errors import TransientSinkError

        if BlobSink.down:
            raise TransientSinkError("endpoint down")
        for path in frame.get_column("path").to_list():
            assert Path(path).exists(), f"{path} deleted before its row was delivered"
        await super().write(frame, batch_id)


async def test_blobs_stay_while_a_blob_sink_has_their_rows_and_go_after(
    tmp_path: Path, cam: Path
) -> None:
    import asyncio

    from collector.runtime.runner import Runtime

    ListSink.reset()
    BlobSink.down = True
    for i in range(6):
        drop(cam, f"{i}.png", png(i), age=30)
    cfg = config(tmp_path, cam)
    cfg["sources"][0].update(every="50ms", after="delete")
    cfg["sinks"] = [
        {"name": "lake", "type": "collector.testing:ListSink", "batch": {"max_age": "50ms"}},
        {"name": "upload", "type": "tests.sources.test_files:BlobSink",
         "where": "bytes > 0", "batch": {"max_rows": 2, "max_age": "50ms"},
         "spool": {"retry_base": "50ms", "retry_cap": "100ms"}},
    ]
    loaded = load_config(cfg)
    runtime = Runtime(loaded, tmp_path / "data")
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop=stop))
    blob_dir = tmp_path / "data" / "blobs"

    async def until(cond: Any, what: str) -> None:
        for _ in range(300):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    await until(lambda: ListSink.rows("lake").height == 6, "the lake rows")
    await until(lambda: not list(cam.iterdir()), "the camera folder emptied")
    await asyncio.sleep(0.5)  # many sweeps (every 10 ms) while the upload sink is down
    assert len(list(blobs.iter_blob_files(blob_dir))) == 6
    assert runtime.counters.get("blobs_deleted_total", reason="delivered") == 0
    BlobSink.down = False
    await until(lambda: ListSink.rows("upload").height == 6, "the uploads")
    await until(lambda: not list(blobs.iter_blob_files(blob_dir)), "the blobs deleted")
    stop.set()
    assert await task == 0
    assert runtime.counters.get("blobs_deleted_total", reason="delivered") == 6


async def test_a_file_being_written_is_taken_only_once_quiet(tmp_path: Path, cam: Path) -> None:
    """A real writer appends for a second; polls meanwhile do not take the file."""
    import asyncio
    import threading

    data = png(7, size=4000)
    target = cam / "slow.png"

    def writer() -> None:
        with open(target, "wb") as fh:
            for i in range(0, len(data), len(data) // 10):
                fh.write(data[i : i + len(data) // 10])
                fh.flush()
                time.sleep(0.1)

    cfg = FilesConfig(type="files", name="camera", path=str(cam), settle="300ms")
    src = FilesSource(cfg, Context(device="edge-01", component="camera",
                                   data_dir=tmp_path / "data"))
    await src.open()
    thread = threading.Thread(target=writer)
    thread.start()
    taken: list[pl.DataFrame] = []
    while thread.is_alive():
        taken.append(src.read())
        await asyncio.sleep(0.05)
    assert sum(f.height for f in taken) == 0  # never while it was growing
    await asyncio.sleep(0.4)
    row = src.read().row(0, named=True)
    assert Path(row["path"]).read_bytes() == data == target.read_bytes()


async def test_drop_newest_dead_letters_a_file_that_does_not_fit(
    tmp_path: Path, cam: Path
) -> None:
    size = len(png(0))
    blobs.attach(tmp_path / "data", BlobsConfig(max_bytes=2 * size, when_full="drop_newest"),
                 Context(device="x", component="x", data_dir=tmp_path).counters)
    for i in range(3):
        drop(cam, f"{i}.png", png(i), age=30 - i)
    src = await opened(source(tmp_path, cam, after="delete"))
    assert src.read().get_column("file").to_list() == ["0.png", "1.png"]
    dead = dead_letters(tmp_path)
    assert len(dead) == 1 and "blob store full" in dead[0]["reason"]
    assert Path(dead[0]["raw"]).name == "2.png"
    src.read()
    assert [p.name for p in cam.iterdir()] == ["2.png"]  # left in its folder, not lost


async def test_block_leaves_files_in_the_folder_until_there_is_room(
    tmp_path: Path, cam: Path
) -> None:
    size = len(png(0))
    store = blobs.attach(tmp_path / "data", BlobsConfig(max_bytes=2 * size),
                         Context(device="x", component="x", data_dir=tmp_path).counters)
    for i in range(3):
        drop(cam, f"{i}.png", png(i), age=30 - i)
    src = await opened(source(tmp_path, cam))
    assert src.read().get_column("file").to_list() == ["0.png", "1.png"]
    assert src.read().height == 0  # full: 2.png waits
    assert dead_letters(tmp_path) == []
    store.sweep(set())  # their rows were delivered
    assert src.read().get_column("file").to_list() == ["2.png"]


async def test_a_folder_that_appears_later_is_watched_from_then_on(tmp_path: Path) -> None:
    later = tmp_path / "mounted-later"
    src = await opened(source(tmp_path, later))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        src.read()  # the runtime counts it and tries again on the next tick
    later.mkdir()
    drop(later, "a.png", png(1), age=30)
    assert src.read().height == 1


def test_config_errors_say_what_is_wrong(tmp_path: Path) -> None:
    base = {"type": "files", "path": str(tmp_path)}
    for bad, message in (
        ({"after": "move"}, "needs `move_to`"),
        ({"move_to": str(tmp_path / "x")}, "applies to `after: move` only"),
        ({"after": "move", "move_to": str(tmp_path)}, "another folder"),
        ({"glob": "../*.png"}, "inside `path`"),
        ({"time_pattern": "(unclosed"}, "not a regular expression"),
        ({"tags": {"file": "x"}}, "clash"),
    ):
        with pytest.raises(ValueError, match=message):
            FilesConfig(**base, **bad)
