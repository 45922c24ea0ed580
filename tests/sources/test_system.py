"""The system source reads this machine through psutil."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import polars as pl
import psutil
import pytest

from collector.plugin import Context
from collector.sources.system import SystemConfig, SystemSource
from tests.sources.peers import PY, ROOT, read_lake, write_config


async def test_reads_host_metrics(tmp_path: Path) -> None:
    cfg = SystemConfig.model_validate({"type": "system", "disks": ["/", str(tmp_path / "gone")]})
    assert cfg.every == 10.0 and cfg.tags == {"mount": "", "sensor": ""}
    src = SystemSource(cfg, Context(device="gw", component="host", data_dir=tmp_path))
    await src.open()
    first = src.read()
    (tmp_path / "traffic").write_bytes(b"x")  # any tick later: the rate needs two samples
    second = src.read()
    got = {r["metric"]: r for r in second}
    assert 0 <= got["cpu_percent"]["value"] <= 100
    assert 0 < got["memory_used_percent"]["value"] < 100
    assert got["memory_available_bytes"]["value"] > 0
    disk = [r for r in second if r["metric"] == "disk_used_percent"]
    assert [r["mount"] for r in disk] == ["/"]  # the missing mount is counted, not fatal
    assert disk[0]["value"] == pytest.approx(psutil.disk_usage("/").percent, abs=1)
    assert src.ctx.counters.get("system_errors_total", component="host", kind="disk") == 2
    assert "net_bytes_sent_per_s" not in {r["metric"] for r in first}
    assert got["net_bytes_recv_per_s"]["value"] >= 0
    assert got["net_bytes_sent_total"]["unit"] == "B"
    temps = [r for r in second if r["metric"] == "temperature"]
    sensors = getattr(psutil, "sensors_temperatures", dict)()
    assert len(temps) == sum(len(v) for v in sensors.values())


async def test_first_cpu_reading_after_start_is_measured(tmp_path: Path) -> None:
    """The runtime calls read() in a worker thread: the first tick's cpu_percent still spans
    the time since open() (it was 0.0, psutil's per-thread priming was never compared with)."""
    cfg = SystemConfig.model_validate({"type": "system", "include": ["cpu"]})
    src = SystemSource(cfg, Context(device="gw", component="host", data_dir=tmp_path))
    await src.open()
    spent = time.process_time()
    while time.process_time() - spent < 0.3:  # this process keeps a CPU busy meanwhile
        pass
    rows = await asyncio.to_thread(src.read)
    (cpu,) = [r["value"] for r in rows if r["metric"] == "cpu_percent"]
    assert 0 < cpu <= 100
    later = await asyncio.to_thread(src.read)  # another tick, maybe another thread
    assert 0 <= next(r["value"] for r in later if r["metric"] == "cpu_percent") <= 100


def test_include_limits_groups(tmp_path: Path) -> None:
    cfg = SystemConfig.model_validate({"type": "system", "include": ["memory"], "every": "1m"})
    assert cfg.tags == {} and cfg.every == 60
    rows = SystemSource(cfg, Context(device="gw", component="h", data_dir=tmp_path)).read()
    assert {r["metric"] for r in rows} == {
        "memory_used_percent",
        "memory_available_bytes",
        "swap_used_percent",
    }


def test_cli_once_lands_in_lake(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = write_config(
        tmp_path / "c.yaml",
        """\
  - name: host
    type: system
    include: [cpu, memory, disk]
""",
        data,
    )
    out = subprocess.run(
        [PY, "-m", "collector", "run", str(cfg), "--once"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    df = read_lake(data / "lake")
    assert {"cpu_percent", "memory_used_percent", "disk_used_percent"} <= set(df["metric"])
    assert df.filter(pl.col("metric") == "disk_used_percent")["mount"].to_list() == ["/"]
    assert set(df.filter(pl.col("metric") == "cpu_percent")["mount"]) == {""}
