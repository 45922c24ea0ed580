"""The serial source against a real pty pair (socat) and a simulated device process."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from collector.errors import SourceError
from collector.plugin import Context
from collector.sources.serial import LineFramer, SerialConfig, SerialSource
from tests.sources.peers import (
    SocatPair,
    async_wait_for,
    collect,
    collector_alive,
    helper,
    read_lake,
    start_collector,
    stop_process,
    wait_for,
    wait_line,
    write_config,
)

KV = {"type": "kv", "rename": {"T": "temperature", "H": "humidity"}}


def expected_temperature(seq: int) -> float:
    return 20 + (seq % 100) / 10  # what sim_device.py prints for line `seq`


def make_source(tmp_path: Path, port: Path, **cfg: Any) -> SerialSource:
    config = SerialConfig.model_validate(
        {
            "type": "serial",
            "name": "th",
            "port": str(port),
            "parser": KV,
            "timeout": "200ms",
            "reconnect": {"initial": "100ms", "max": "500ms"},
            **cfg,
        }
    )
    return SerialSource(config, Context(device="d1", component="th", data_dir=tmp_path))


def seqs(rows: list[dict[str, Any]]) -> list[int]:
    return [int(r["SEQ"]) for r in rows]


def test_config_rules() -> None:
    base = {"type": "serial", "port": "/dev/ttyUSB0", "parser": KV}
    assert SerialConfig.model_validate({**base, "request": "R\n"}).every == 5.0
    with pytest.raises(ValidationError, match="no schedule"):
        SerialConfig.model_validate({**base, "every": "5s"})
    with pytest.raises(ValidationError, match="parser"):
        SerialConfig.model_validate({**base, "parser": {"type": "xml"}})
    short = SerialConfig.model_validate({**base, "parser": "kv"})  # `parser: kv`
    assert short.parser.parse("T=1") == [{"T": 1.0}]


def test_framer_splits_and_cuts_overlong_lines() -> None:
    f = LineFramer(b"\n", max_line=8)
    assert f.feed(b"ab\ncd") == [(b"ab", False)]
    assert f.feed(b"e\n") == [(b"cde", False)]
    assert f.feed(b"0123456789") == [(b"01234567", True)]
    assert f.feed(b"xx\nok\n") == [(b"ok", False)]  # the rest of the long line is dropped


async def test_stream_reads_every_line_the_device_prints(
    tmp_path: Path, socat_pair: SocatPair
) -> None:
    src = make_source(tmp_path, socat_pair.dev)
    await src.open()
    rows: list[dict[str, Any]] = []
    task = asyncio.create_task(collect(src.stream(), rows))
    try:
        with helper(["sim_device.py", str(socat_pair.sim), "--rate", "100", "--count", "60"]):
            await async_wait_for(lambda: len(rows) >= 60, 30, "60 readings")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await src.close()
    assert seqs(rows) == list(range(60))
    assert [r["temperature"] for r in rows] == [expected_temperature(i) for i in range(60)]
    assert all(isinstance(r["ts"], datetime) and r["ts"].tzinfo is UTC for r in rows)


async def test_unplug_and_replug_resume_reading(tmp_path: Path, socat_pair: SocatPair) -> None:
    src = make_source(tmp_path, socat_pair.dev)
    await src.open()
    rows: list[dict[str, Any]] = []
    task = asyncio.create_task(collect(src.stream(), rows))
    counters = src.ctx.counters
    try:
        with helper(["sim_device.py", str(socat_pair.sim), "--rate", "50"]):
            await async_wait_for(lambda: len(rows) >= 5, 30, "readings before the unplug")
            socat_pair.stop()
            await async_wait_for(
                lambda: counters.get("serial_errors_total", component="th") >= 2,
                30,
                "the source to notice the unplug and retry",
            )
            before = len(rows)
            socat_pair.start()
            await async_wait_for(lambda: len(rows) >= before + 10, 30, "readings after replug")
            assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await src.close()
    assert counters.get("serial_disconnects_total", component="th") == 1
    assert counters.get("serial_reconnects_total", component="th") == 1
    after = seqs(rows[before:])
    assert after == sorted(after) and after[0] > seqs(rows[:before])[-1]


async def test_request_response_mode(tmp_path: Path, socat_pair: SocatPair) -> None:
    src = make_source(
        tmp_path,
        socat_pair.dev,
        request="READ\r\n",
        every="1s",
        parser={"type": "csv", "columns": ["pressure", "flow", None, "temp"]},
    )
    assert src.long_lived is False  # the runtime schedules read() with `every`
    await src.open()
    try:
        with pytest.raises(SourceError, match="no answer"):
            await src.read()  # nobody answers yet
        with helper(["sim_device.py", str(socat_pair.sim), "--respond"], ready="ready"):
            rows = await src.read()
            rows2 = await src.read()
            stream = src.stream()  # a runtime that only knows stream() gets the same, paced
            rows3 = await asyncio.wait_for(anext(stream), 30)
            await stream.aclose()
    finally:
        await src.close()
    for got in (rows, rows2, rows3):
        assert [{k: v for k, v in r.items() if k != "ts"} for r in got] == [
            {"pressure": 1.5, "flow": 2.5, "temp": 40.0}
        ]


# -- through the real CLI: values land in the lake, garbage in the dead-letter file ---------


_PRINTABLE = bytes(b for b in range(33, 127) if b not in b",;=")
garbage_line = st.one_of(
    # arbitrary bytes around a printable non-separator byte, no '=': certainly not kv
    st.tuples(st.binary(max_size=20), st.sampled_from(_PRINTABLE), st.binary(max_size=20)).map(
        lambda t: (t[0] + bytes([t[1]]) + t[2]).replace(b"\n", b"").replace(b"=", b"")
    ),
    # near misses: bad values, missing values or keys, duplicated keys, broken UTF-8
    st.builds(
        lambda k, v: f"{k}={v}".encode(),
        st.sampled_from("THX"),
        st.text(alphabet="xyz#?!", min_size=1, max_size=6),
    ),
    st.sampled_from([b"T=", b"=21.5", b"T=1 T=2", b"T=1 H", b"T=\xff\xfe", b"\x00\x01\x02"]),
)


def fuzzed_garbage(n: int = 1000) -> list[bytes]:
    """``n`` garbage lines, one hypothesis example each, drawn outside the test body: the peers
    are too slow to run per example, and a failure must not replay minutes of processes."""
    drawn: list[bytes] = []

    @settings(
        max_examples=n,
        phases=[Phase.generate],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(garbage_line)
    def draw(line: bytes) -> None:
        drawn.append(line)

    draw()
    return (drawn * (n // max(len(drawn), 1) + 1))[:n]  # hypothesis may stop early on repeats


@pytest.mark.slow
def test_cli_garbage_burst_unplug_replug(tmp_path: Path) -> None:
    garbage = fuzzed_garbage()
    assert len(garbage) == 1000
    tmp = tmp_path
    pair = SocatPair(tmp)
    pair.start()
    burst = tmp / "burst.bin"
    burst.write_bytes(b"".join(g + b"\n" for g in garbage))
    data = tmp / "data"
    cfg = write_config(
        tmp / "c.yaml",
        f"""\
  - name: th
    type: serial
    port: {pair.dev}
    timeout: 200ms
    reconnect: {{initial: 100ms, max: 1s}}
    parser: {{type: kv, rename: {{T: temperature, H: humidity}}}}
    units: {{temperature: C}}
""",
        data,
    )
    log = tmp / "collector.log"
    proc = start_collector(cfg, log)
    lake = data / "lake"
    dead = data / "dead-letter" / "th.ndjson"
    try:  # pyserial drops input that arrived before it opened the port: wait for that
        wait_for(
            lambda: f"serial port {pair.dev} open" in log.read_text(),
            60,
            "the collector to open the port",
        )
        with helper(
            [
                "sim_device.py",
                str(pair.sim),
                "--rate",
                "50",
                "--burst",
                str(burst),
                "--burst-after",
                "20",
            ]
        ) as sim:
            wait_line(sim, "burst-done", 60)

            def seq_in_lake() -> pl.DataFrame:
                df = read_lake(lake)
                return df.filter(pl.col("metric") == "SEQ") if df.height else df

            wait_for(
                lambda: seq_in_lake().height and seq_in_lake()["value"].max() > 40,
                60,
                "valid lines after the burst in the lake",
            )
            collector_alive(proc, log)
            entries = [json.loads(x) for x in dead.read_text().splitlines()]
            assert [e["raw"] for e in entries] == [
                g.decode("utf-8", "backslashreplace") for g in garbage
            ]
            assert all(e["component"] == "th" and e["reason"] for e in entries)

            pair.stop()  # unplug
            collector_alive(proc, log)
            replugged = datetime.now(UTC)
            pair.start()
            wait_for(
                lambda: seq_in_lake().filter(pl.col("ts") > replugged).height >= 5,
                60,
                "readings after the replug in the lake",
            )
            collector_alive(proc, log)
    finally:
        stop_process(proc, signal.SIGTERM)
        if pair.proc is not None:
            stop_process(pair.proc)
    assert proc.returncode == 0, log.read_text()[-4000:]
    df = read_lake(lake)
    temps = df.filter(pl.col("metric") == "temperature").sort("ts")
    seq = df.filter(pl.col("metric") == "SEQ").sort("ts")
    assert temps.height == seq.height > 40
    assert temps["value"].to_list() == [expected_temperature(int(s)) for s in seq["value"]]
    assert set(temps["unit"]) == {"C"} and set(df["device"]) == {"test-gw"}
    assert set(df["source"]) == {"th"}
    assert re.search(r"serial port .* unavailable", log.read_text())
