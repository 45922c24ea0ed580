"""Damaged files in the data dir: quarantined, counted, logged; never fatal, never silent.

Each test damages a file the way a bad flash cell, a power cut or a hostile operator would, then
runs the real CLI and asserts on what landed: every reading outside the damage exactly once, the
damaged bytes in ``quarantine/`` with a note, an ERROR line that says what was lost.
"""

from __future__ import annotations

import json
import pickle
import signal
import time
from pathlib import Path

import pytest

from collector.runtime.log import DeviceLog
from tests.chaos.conftest import write_csv
from tests.e2e.conftest import Collector, read_lake, run_cli, wait_for, write_config

pytestmark = pytest.mark.slow


def _replay_config(tmp_path: Path, n: int, sink: dict) -> Path:
    return write_config(
        tmp_path / "c.yaml",
        {
            "device": "edge-01",
            "data_dir": str(tmp_path / "data"),
            "log": {"checkpoint_every": "1h"},
            "sources": [
                {
                    "name": "rp",
                    "type": "replay",
                    "path": str(write_csv(tmp_path / "in.csv", n)),
                    "speed": "max",
                    "chunk_rows": 2,
                }
            ],
            "sinks": [sink],
        },
    )


def _logged_rows(data_dir: Path) -> int:
    """Readings in the log: rows, or (a replay) references to rows of its file."""
    n = 0
    for e in DeviceLog(data_dir / "log").read(0):
        ref = (e.meta or {}).get("r")
        n += e.frame.height if e.frame is not None else ref["hi"] - ref["lo"] if ref else 0
    return n


def _quarantined(data_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((data_dir / "quarantine").glob("*.json"))]


def test_flipped_byte_in_the_log_costs_one_record_not_the_rest(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    data = tmp_path / "data"
    lake = tmp_path / "lake"
    sink = {"name": "lake", "type": "lake", "path": str(lake), "batch": {"max_age": "1h"}}
    cfg = _replay_config(tmp_path, 152, sink)
    c = Collector(cfg)
    collectors.append(c)
    wait_for(lambda: (data / "log").exists() and _logged_rows(data) == 152, what="152 logged")
    c.stop(signal.SIGKILL)
    assert not list(lake.glob("**/*.parquet"))  # nothing was cut before the kill
    seg = next((data / "log").glob("*.log"))
    raw = bytearray(seg.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    seg.write_bytes(bytes(raw))

    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr
    assert "damaged data in log/" in res.stderr and "ERROR" in res.stderr
    got = read_lake(lake).get_column("value").to_list()
    assert len(got) == 150 and len(set(got)) == 150  # one record of 2 readings, no more
    notes = _quarantined(data)
    assert len(notes) == 1 and notes[0]["reason"] == "damaged record"
    assert "1 record(s)" in notes[0]["detail"]


def test_truncated_oldest_spool_file_costs_only_its_rows(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    data = tmp_path / "data"
    out = tmp_path / "out"
    flag = tmp_path / "down"
    flag.touch()
    sink = {
        "name": "flaky",
        "type": "tests.e2e.flaky_sink:FlakySink",
        "path": str(out),
        "down_flag": str(flag),
        "batch": {"max_rows": 50},
        "spool": {"retry_base": "100ms", "retry_cap": "200ms"},
    }
    cfg = _replay_config(tmp_path, 402, sink)
    c = Collector(cfg)
    collectors.append(c)
    spool = data / "spool" / "flaky"
    wait_for(lambda: len(list(spool.glob("*.arrow"))) == 8, what="8 spooled batches")
    assert c.stop() == 0
    files = sorted(spool.glob("*.arrow"))
    oldest = min(files, key=lambda p: p.name.rsplit("-", 2)[-2])
    oldest.write_bytes(oldest.read_bytes()[: oldest.stat().st_size // 2])
    (spool / "zz-garbage-000000000999-000000000999.arrow").write_bytes(b"not arrow at all")
    flag.unlink()

    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr
    values = read_lake(out).get_column("value").to_list()
    assert len(values) == len(set(values)) == 402 - 50  # all but the truncated batch
    notes = _quarantined(data)
    assert sorted(n["file"].rsplit("/", 1)[-1] for n in notes) == sorted(
        [oldest.name, "zz-garbage-000000000999-000000000999.arrow"]
    )
    status = json.loads(run_cli("status", "--data-dir", str(data), "--json").stdout)
    assert status["sinks"]["flaky"]["dropped_rows"] == {"corrupt": 50}
    assert not list(spool.glob("*.arrow")) and not list(spool.glob("*.corrupt"))


def _window_config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "w.yaml",
        {
            "device": "edge-01",
            "data_dir": str(tmp_path / "data"),
            "sources": [
                {
                    "name": "sim",
                    "type": "simulated",
                    "every": "1s",
                    "start": "2024-01-01T00:00:00Z",
                    "metrics": {"t": {"kind": "uniform", "min": 0, "max": 1}},
                }
            ],
            "transforms": [{"type": "window", "every": "1h"}],
            "sinks": [{"name": "lake", "type": "lake", "path": str(tmp_path / "lake")}],
        },
    )


@pytest.mark.parametrize("damage", ["empty", "random", "both"])
def test_unreadable_checkpoint_falls_back_instead_of_failing(tmp_path: Path, damage: str) -> None:
    cfg = _window_config(tmp_path)
    for _ in range(2):  # two runs: a checkpoint and the one before it
        assert run_cli("run", str(cfg), "--once").returncode == 0
    state = tmp_path / "data" / "state"
    bad = b"" if damage == "empty" else bytes(range(256)) * 7
    (state / "checkpoint").write_bytes(bad)
    if damage == "both":
        (state / "checkpoint.prev").write_bytes(bad)

    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    if damage == "both":
        assert "no readable checkpoint" in res.stderr
    else:
        assert "using the previous checkpoint" in res.stderr
    assert any(n["file"] == "state/checkpoint" for n in _quarantined(tmp_path / "data"))
    # the next start reads the checkpoint this run wrote
    again = run_cli("run", str(cfg), "--once")
    assert again.returncode == 0, again.stderr
    assert "previous checkpoint" not in again.stderr
    assert "no readable checkpoint" not in again.stderr


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_pickle_checkpoint_of_an_older_version_is_never_loaded(tmp_path: Path) -> None:
    cfg = _window_config(tmp_path)
    state = tmp_path / "data" / "state"
    state.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (state / "checkpoint.pkl").write_bytes(pickle.dumps(_Boom(str(marker))))
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr
    time.sleep(0.1)
    assert not marker.exists()
    assert "old pickle checkpoint not loaded" in res.stderr
    assert not (state / "checkpoint.pkl").exists()
    assert (state / "checkpoint").exists()
