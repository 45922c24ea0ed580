"""Nothing is lost: kill -9, sink outages, full spools, full disks, reloads (real processes)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from collector.runtime.log import DeviceLog, Kind
from tests.e2e.conftest import Collector, read_lake, run_cli, wait_for, write_config

KEY = ["ts", "device", "metric"]


def fast_source(every: str = "50ms", metrics: int = 2) -> dict:
    names = ["temperature", "humidity", "pressure"][:metrics]
    return {"name": "sim", "type": "simulated", "every": every, "seed": 3,
            "metrics": {m: {"kind": "uniform", "min": 0, "max": 30} for m in names}}


def logged_readings(data_dir: Path) -> pl.DataFrame:
    """Every reading in the device log (nothing is truncated with one segment)."""
    frames = [e.frame for e in DeviceLog(data_dir / "log").read(0)
              if e.kind == Kind.DATA and e.frame is not None]
    return pl.concat(frames).select(KEY) if frames else pl.DataFrame()


def status(data_dir: Path) -> dict:
    return json.loads((data_dir / "status.json").read_text())


def test_kill_9_many_times_loses_nothing_and_duplicates_nothing(
        tmp_path: Path, collectors: list[Collector]) -> None:
    data, lake = tmp_path / "data", tmp_path / "lake"
    cfg = write_config(tmp_path / "c.yaml", {
        "device": "gw", "data_dir": str(data),
        "log": {"checkpoint_every": "300ms"},
        "sources": [fast_source()],
        "sinks": [{"name": "lake", "type": "lake", "path": str(lake),
                   "batch": {"max_rows": 7, "max_age": "200ms"}}],
    })
    rng = random.Random(1234)
    for _ in range(10):
        c = Collector(cfg)
        collectors.append(c)
        wait_for(lambda: (data / "log").exists(), what="collector start")
        time.sleep(rng.uniform(0.4, 1.6))
        c.proc.kill()  # SIGKILL: no flush, no checkpoint, maybe mid-write
        c.proc.wait()
        c.fh.close()
    before = logged_readings(data)
    assert before.height > 50
    res = run_cli("run", str(cfg), "--once")  # recover: replay from the last checkpoint
    assert res.returncode == 0, res.stderr
    landed = read_lake(lake)
    dupes = landed.group_by(KEY).len().filter(pl.col("len") > 1)
    assert dupes.height == 0, f"duplicated readings: {dupes}"
    missing = before.join(landed.select(KEY), on=KEY, how="anti")
    assert missing.height == 0, f"{missing.height} logged readings never reached the lake"
    assert landed.height == logged_readings(data).height  # nothing extra either


def test_outage_then_recovery_delivers_everything_in_order_within_spool_bound(
        tmp_path: Path, collectors: list[Collector]) -> None:
    data, out, flag = tmp_path / "data", tmp_path / "out", tmp_path / "DOWN"
    flag.touch()
    max_bytes = 20_000
    cfg = write_config(tmp_path / "c.yaml", {
        "device": "gw", "data_dir": str(data),
        "sources": [fast_source("20ms")],
        "sinks": [{"name": "flaky", "type": "tests.e2e.flaky_sink:FlakySink",
                   "path": str(out), "down_flag": str(flag),
                   "batch": {"max_rows": 10, "max_age": "100ms"},
                   "spool": {"max_bytes": max_bytes, "when_full": "block",
                             "retry_base": "100ms", "retry_cap": "300ms"}}],
    })
    c = Collector(cfg)
    collectors.append(c)
    spool = data / "spool" / "flaky"
    peak = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # down: the spool fills up to its bound, not past it
        files = [*spool.glob("*.arrow"), *spool.glob("inflight/*.arrow")]
        peak = max(peak, sum(f.stat().st_size for f in files if f.exists()))
        time.sleep(0.05)
    assert 0.5 * max_bytes < peak <= max_bytes
    flag.unlink()  # the service is back
    wait_for(lambda: not list(spool.glob("*.arrow")), timeout=60, what="spool drained")
    assert c.stop() == 0, c.output()
    order = [line.split()[1] for line in (out / "ORDER").read_text().splitlines()]
    assert order == sorted(order), "batches were delivered out of order"
    landed = read_lake(out)
    logged = logged_readings(data)
    assert landed.group_by(KEY).len()["len"].max() == 1
    assert logged.join(landed, on=KEY, how="anti").height == 0
    s = status(data)["sinks"]["flaky"]
    assert s["delivered_rows"] == landed.height == s["spooled_rows"]
    assert s["retries"] > 0 and not s["dropped_rows"]


def test_drop_oldest_counts_exactly_what_is_missing(
        tmp_path: Path, collectors: list[Collector]) -> None:
    data, out, flag = tmp_path / "data", tmp_path / "out", tmp_path / "DOWN"
    flag.touch()
    cfg = write_config(tmp_path / "c.yaml", {
        "device": "gw", "data_dir": str(data),
        "sources": [fast_source("20ms")],
        "sinks": [{"name": "flaky", "type": "tests.e2e.flaky_sink:FlakySink",
                   "path": str(out), "down_flag": str(flag),
                   "batch": {"max_rows": 10, "max_age": "100ms"},
                   "spool": {"max_bytes": 15_000, "when_full": "drop_oldest",
                             "retry_base": "100ms", "retry_cap": "300ms"}}],
    })
    c = Collector(cfg)
    collectors.append(c)
    time.sleep(4)
    flag.unlink()
    spool = data / "spool" / "flaky"
    wait_for(lambda: not list(spool.glob("*.arrow")), timeout=60, what="spool drained")
    assert c.stop() == 0, c.output()
    assert not list(spool.glob("**/*.arrow")), "rows left in the spool after shutdown"
    landed = read_lake(out)
    logged = logged_readings(data)
    s = status(data)["sinks"]["flaky"]
    dropped = s["dropped_rows"].get("spool_full", 0)
    assert dropped > 0
    assert logged.height - landed.height == dropped
    # what survived is the newest: every delivered batch is newer than every dropped one
    assert landed.group_by(KEY).len()["len"].max() == 1


def test_reconciliation_in_equals_delivered_plus_dead_plus_dropped(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", {
        "device": "gw", "data_dir": str(data),
        "sources": [{"name": "replay", "type": "python",
                     "function": "tests.e2e.user_code:burst"}],
        "sinks": [
            {"name": "flaky", "type": "tests.e2e.flaky_sink:FlakySink", "path": str(out),
             "down_flag": str(tmp_path / "never"), "reject_every": 3,
             "batch": {"max_rows": 25}},
            {"name": "lake", "type": "lake", "path": str(tmp_path / "lake"),
             "where": "value >= 50"},
        ],
    })
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr
    st = status(data)["sinks"]
    for name, s in st.items():
        accounted = s["delivered_rows"] + s["dead_lettered_rows"] + sum(
            s["dropped_rows"].values()) + s["spool_backlog_rows"]
        assert s["spooled_rows"] == accounted, (name, s)
    assert st["flaky"]["spooled_rows"] == 200 and st["lake"]["spooled_rows"] == 150
    dead = pl.read_parquet(data / "spool" / "flaky" / "dead-letter" / "*.parquet")
    assert dead.height == st["flaky"]["dead_lettered_rows"] > 0
    assert set(dead["dead_letter_sink"]) == {"flaky"}
    assert dead["dead_letter_reason"][0].startswith("batch ")
    assert read_lake(out).height + dead.height == 200


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True)
    return res.returncode == 0


def test_disk_full_does_not_crash(tmp_path: Path, collectors: list[Collector]) -> None:
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "600k"):
        pytest.skip("cannot mount a tmpfs here (needs root); no disk-full simulation")
    try:
        cfg = write_config(tmp_path / "c.yaml", {
            "device": "gw", "data_dir": str(small / "data"),
            "sources": [fast_source("10ms", metrics=3)],
            "sinks": [{"name": "lake", "type": "lake", "path": str(small / "lake"),
                       "batch": {"max_age": "100ms"}}],
        })
        c = Collector(cfg)
        collectors.append(c)
        wait_for(lambda: "No space left on device" in c.output(), timeout=60,
                 what="the disk to fill up")
        time.sleep(1)
        assert c.alive(), c.output()
        assert c.stop() == 0, c.output()
        out = c.output()
        at = out.find("Traceback")
        assert at < 0, out[max(0, at - 300) : at + 3000]
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_sighup_reload_rejects_bad_config_and_applies_good_one(
        tmp_path: Path, collectors: list[Collector]) -> None:
    data = tmp_path / "data"
    conf = {"device": "gw", "data_dir": str(data), "sources": [fast_source("100ms", 1)],
            "sinks": [{"name": "a", "type": "lake", "path": str(tmp_path / "a"),
                       "batch": {"max_age": "100ms"}}]}
    cfg = write_config(tmp_path / "c.yaml", conf)
    c = Collector(cfg)
    collectors.append(c)
    wait_for(lambda: list((tmp_path / "a").glob("**/*.parquet")), what="first files")
    cfg.write_text(cfg.read_text().replace("type: lake", "type: lakee"))
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected" in c.output(), what="rejection in the log")
    assert c.alive()
    conf["sinks"][0]["path"] = str(tmp_path / "b")
    write_config(cfg, conf)
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: list((tmp_path / "b").glob("**/*.parquet")), what="files of new config")
    assert c.stop() == 0
    assert "unknown sink type 'lakee'" in c.output()


def test_metrics_health_and_status(tmp_path: Path, collectors: list[Collector]) -> None:
    data, flag = tmp_path / "data", tmp_path / "DOWN"
    conf = {"device": "gw", "data_dir": str(data), "sources": [fast_source("100ms", 1)],
            "telemetry": {"enabled": True, "port": 0, "unhealthy_after": "1s"},
            "sinks": [{"name": "flaky", "type": "tests.e2e.flaky_sink:FlakySink",
                       "path": str(tmp_path / "out"), "down_flag": str(flag),
                       "batch": {"max_age": "100ms"},
                       "spool": {"retry_base": "200ms", "retry_cap": "500ms"}}]}
    cfg = write_config(tmp_path / "c.yaml", conf)
    c = Collector(cfg)
    collectors.append(c)
    port = int(wait_for(lambda: _port(c.output()), what="metrics port"))

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    wait_for(lambda: "edge_collector_delivered_rows" in get("/metrics")[1], what="deliveries")
    code, text = get("/metrics")
    assert code == 200 and 'edge_collector_rows_in_total{source="sim"}' in text
    assert get("/health")[0] == 200
    flag.touch()
    wait_for(lambda: get("/health")[0] == 503, timeout=30, what="unhealthy")
    assert "flaky" in json.loads(get("/health")[1])["failing"]
    def live_status() -> dict:
        return json.loads(run_cli("status", "--data-dir", str(data), "--json").stdout)

    live = wait_for(lambda: (st := live_status())["sinks"]["flaky"].get("last_error") and st,
                    what="the failure in the status file")
    assert live["alive"] is True and "flag file" in live["sinks"]["flaky"]["last_error"]
    c.proc.kill()
    c.proc.wait()
    dead = json.loads(run_cli("status", "--data-dir", str(data), "--json").stdout)
    assert dead["alive"] is False
    assert dead["sinks"]["flaky"]["backlog_files"] >= 1  # the backlog waits for the next start
    table = run_cli("status", "--data-dir", str(data)).stdout
    assert "flaky" in table and "not running" in table


def _port(output: str) -> str | None:
    import re

    m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", output.replace("\n", " "))
    return m.group(1) if m else None


def test_priority_drains_the_important_sink_first(tmp_path: Path) -> None:
    data, out, flag = tmp_path / "data", tmp_path / "out", tmp_path / "DOWN"

    def conf(function: str) -> dict:
        return {
            "device": "gw", "data_dir": str(data), "shutdown_timeout": "1s",
            "sources": [{"name": "src", "type": "python",
                         "function": f"tests.e2e.user_code:{function}"}],
            "sinks": [{"name": name, "type": "tests.e2e.flaky_sink:FlakySink",
                       "path": str(out), "down_flag": str(flag),
                       "batch": {"max_rows": 20},
                       "spool": {"priority": prio, "retry_base": "100ms"}}
                      for name, prio in (("bulk", 5), ("alerts", 0))],
        }

    flag.touch()  # both services down: the backlog builds up in both spools
    res = run_cli("run", str(write_config(tmp_path / "a.yaml", conf("burst"))), "--once")
    assert res.returncode == 1, res.stderr  # rows kept in the spool, said so
    assert "kept in the spool" in res.stderr
    flag.unlink()
    res = run_cli("run", str(write_config(tmp_path / "b.yaml", conf("nothing"))), "--once")
    assert res.returncode == 0, res.stderr
    order = [line.split()[0] for line in (out / "ORDER").read_text().splitlines()]
    assert order == ["alerts"] * 10 + ["bulk"] * 10


def test_max_retries_dead_letters_instead_of_waiting_forever(tmp_path: Path) -> None:
    data, flag = tmp_path / "data", tmp_path / "DOWN"
    flag.touch()
    cfg = write_config(tmp_path / "c.yaml", {
        "device": "gw", "data_dir": str(data),
        "sources": [{"name": "src", "type": "python", "function": "tests.e2e.user_code:burst"}],
        "sinks": [{"name": "flaky", "type": "tests.e2e.flaky_sink:FlakySink",
                   "path": str(tmp_path / "out"), "down_flag": str(flag),
                   "batch": {"max_rows": 100},
                   "spool": {"max_retries": 2, "retry_base": "50ms", "retry_cap": "100ms"}}],
    })
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr
    dead = pl.read_parquet(data / "spool" / "flaky" / "dead-letter" / "*.parquet")
    assert sorted(dead["value"].to_list()) == [float(v) for v in range(200)]
    assert dead["dead_letter_reason"].str.starts_with("gave up after 2 retries").all()
    s = status(data)["sinks"]["flaky"]
    assert s["dead_lettered_rows"] == 200 and s["retries"] == 6


def test_a_failing_transform_dead_letters_its_readings_and_the_pipeline_goes_on(
        tmp_path: Path) -> None:
    data, lake = tmp_path / "data", tmp_path / "lake"
    cfg = write_config(tmp_path / "c.yaml", {
        "device": "gw", "data_dir": str(data),
        "sources": [{"name": "bad", "type": "python", "function": "tests.e2e.user_code:poison"},
                    {"name": "good", "type": "python", "function": "tests.e2e.user_code:burst"}],
        "transforms": [{"type": "python", "function": "tests.e2e.user_code:refuse_negative"}],
        "sinks": [{"name": "lake", "type": "lake", "path": str(lake)}],
    })
    res = run_cli("run", str(cfg), "--once")
    assert res.returncode == 0, res.stderr
    assert sorted(read_lake(lake)["value"].to_list()) == [float(v) for v in range(200)]
    dead = pl.read_parquet(data / "dead-letter" / "pipeline-*.parquet")
    assert dead["value"].to_list() == [-1.0]
    assert "negative level" in dead["dead_letter_reason"][0]
    assert "negative level" in res.stderr


def test_a_sink_filter_that_cannot_run_dead_letters_instead_of_wedging(tmp_path: Path) -> None:
    data, lake = tmp_path / "data", tmp_path / "lake"
    cfg = write_config(tmp_path / "c.yaml", {
        "device": "gw", "data_dir": str(data),
        "sources": [{"name": "good", "type": "python", "function": "tests.e2e.user_code:burst"}],
        "transforms": [{"type": "python", "function": "tests.e2e.user_code:values_as_text"}],
        "sinks": [{"name": "lake", "type": "lake", "path": str(lake), "where": "value > 3"}],
    })
    assert run_cli("check", str(cfg)).returncode == 0  # user code hides the type from check
    for _ in range(2):  # and a second start does not trip over the same entry again
        res = run_cli("run", str(cfg), "--once")
        assert res.returncode == 0, res.stderr
    dead = pl.read_parquet(data / "dead-letter" / "pipeline-*.parquet")
    assert dead.height == 200 + 200  # each run's burst, kept with the reason
    assert dead["dead_letter_reason"].str.contains("sink lake where").all()


def test_a_failing_important_sink_does_not_hold_back_the_others(tmp_path: Path) -> None:
    data, flag = tmp_path / "data", tmp_path / "DOWN"
    flag.touch()  # the important sink is down for good
    cfg = write_config(tmp_path / "c.yaml", {
        "device": "gw", "data_dir": str(data), "shutdown_timeout": "1s",
        "sources": [{"name": "src", "type": "python", "function": "tests.e2e.user_code:burst"}],
        "sinks": [
            {"name": "alerts", "type": "tests.e2e.flaky_sink:FlakySink",
             "path": str(tmp_path / "a"), "down_flag": str(flag),
             "spool": {"priority": 0, "retry_base": "100ms", "retry_cap": "200ms"}},
            {"name": "bulk", "type": "tests.e2e.flaky_sink:FlakySink",
             "path": str(tmp_path / "b"), "down_flag": str(tmp_path / "never"),
             "spool": {"priority": 5}},
        ],
    })
    res = run_cli("run", str(cfg), "--once", timeout=60)
    assert res.returncode == 1, res.stderr  # alerts kept in the spool, and said so
    assert read_lake(tmp_path / "b").height == 200
