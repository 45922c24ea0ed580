"""The modbus source against a real pymodbus server process, over TCP and RTU (socat ptys).

The server holds raw words the test encodes itself with ``struct`` in each byte and word order,
so the decoding under test (pymodbus' converters plus our byte swap) is checked against an
independent encoder.
"""

from __future__ import annotations

import itertools
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from pydantic import ValidationError

from collector.errors import SourceError
from collector.plugin import Context
from collector.sources.modbus import ModbusConfig, ModbusSource, plan_reads
from tests.sources.peers import (
    PY,
    ROOT,
    SocatPair,
    free_port,
    helper,
    port_open,
    read_lake,
    wait_for,
    write_config,
)

FMT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
VALUES: dict[str, int | float] = {
    "int16": -12345,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3_000_000_000,
    "int64": -9_000_000_000_123,
    "uint64": 2**63 + 4096,
    "float32": 3.14159,
    "float64": -2.718281828459045,
}
ORDERS = list(itertools.product(["big", "little"], ["big", "little"]))


def encode(value: int | float, typ: str, byte_order: str, word_order: str) -> list[int]:
    """Registers a device stores for ``value``: ABCD, CDAB (word swap), BADC, DCBA."""
    raw = struct.pack(">" + FMT[typ], value)
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def expected(typ: str) -> float:
    value = VALUES[typ]
    if typ == "float32":
        return struct.unpack(">f", struct.pack(">f", value))[0]
    return float(value)


def register_map() -> tuple[list[dict[str, Any]], list[int]]:
    """Every type in every byte/word order, packed back to back from address 0."""
    regs, words = [], []
    for typ, (bo, wo) in itertools.product(FMT, ORDERS):
        regs.append(
            {
                "name": f"{typ}_{bo}_{wo}",
                "address": len(words),
                "type": typ,
                "byte_order": bo,
                "word_order": wo,
            }
        )
        words += encode(VALUES[typ], typ, bo, wo)
    return regs, words


HOLDING, HOLDING_WORDS = register_map()
SLAVE1_EXTRA = [
    {"name": "voltage", "address": 0, "function": "input", "type": "float32", "unit": "V"},
    {
        "name": "freq",
        "address": 2,
        "function": "input",
        "type": "uint16",
        "scale": 0.01,
        "unit": "Hz",
    },
    {
        "name": "temp",
        "address": 3,
        "function": "input",
        "type": "int16",
        "scale": 0.1,
        "offset": -40,
    },
    {"name": "relay", "address": 0, "function": "coil"},
    {"name": "door", "address": 1, "function": "coil"},
    {"name": "alarm", "address": 3, "function": "discrete"},
]
SPEC = {
    "devices": [
        {
            "id": 1,
            "hr": {"0": HOLDING_WORDS, "200": [11], "205": [22]},
            "ir": {"0": [*encode(230.5, "float32", "big", "big"), 5002, 650]},
            "co": {"0": [1, 0, 1]},
            "di": {"0": [0, 0, 0, 1]},
        },
        {"id": 2, "hr": {"0": [7, *encode(-1.5, "float32", "big", "little")]}},
    ]
}
SLAVE2 = [
    {"name": "count", "address": 0},
    {"name": "level", "address": 1, "type": "float32", "word_order": "little", "unit": "m"},
]


def source_config(transport: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "modbus",
        "name": "plc",
        "timeout": "500ms",
        "retries": 0,
        **transport,
        "slaves": [
            {"id": 1, "device": "m1", "registers": HOLDING + SLAVE1_EXTRA},
            {"id": 2, "device": "m2", "registers": SLAVE2},
        ],
        **extra,
    }


def make(tmp_path: Path, cfg: dict[str, Any]) -> ModbusSource:
    return ModbusSource(
        ModbusConfig.model_validate(cfg), Context(device="gw", component="plc", data_dir=tmp_path)
    )


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


@pytest.fixture
def tcp_server(spec_file: Path) -> Any:
    port = free_port()
    with helper(["modbus_server.py", str(spec_file), "--tcp", str(port)], ready="ready"):
        wait_for(lambda: port_open(port), 15, "modbus server")
        yield port


def by_key(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r.get("device", "gw"), r["metric"]): r for r in rows}


def check_all_values(rows: list[dict[str, Any]]) -> None:
    got = by_key(rows)
    for typ, (bo, wo) in itertools.product(FMT, ORDERS):
        assert got["m1", f"{typ}_{bo}_{wo}"]["value"] == expected(typ), (typ, bo, wo)
    assert got["m1", "voltage"]["value"] == 230.5 and got["m1", "voltage"]["unit"] == "V"
    assert got["m1", "freq"]["value"] == pytest.approx(50.02)
    assert got["m1", "temp"]["value"] == pytest.approx(25.0)
    assert [got["m1", n]["value"] for n in ("relay", "door", "alarm")] == [1.0, 0.0, 1.0]
    assert got["m2", "count"]["value"] == 7.0 and got["m2", "level"]["value"] == -1.5


def test_plan_groups_contiguous_registers_within_limits() -> None:
    cfg = ModbusConfig.model_validate(source_config({"host": "h"}))
    groups = plan_reads(cfg.slaves[0], max_registers=125, max_bits=2000, max_gap=0)
    spans = {(g.function, g.address, g.count) for g in groups}
    # coils 0-1, discrete 3, holding 0-79 in one request, input 0-3
    assert spans == {("coil", 0, 2), ("discrete", 3, 1), ("holding", 0, 80), ("input", 0, 4)}
    small = plan_reads(cfg.slaves[0], max_registers=10, max_bits=1, max_gap=0)
    assert all(g.count <= 10 for g in small if g.function == "holding")
    assert sum(g.count for g in small if g.function == "holding") == 80  # nothing split apart
    assert len([g for g in small if g.function == "coil"]) == 2
    gap = ModbusConfig.model_validate(
        {
            "type": "modbus",
            "host": "h",
            "registers": [{"name": "a", "address": 0}, {"name": "b", "address": 5}],
        }
    )
    assert len(plan_reads(gap.slaves[0], max_registers=125, max_bits=2000, max_gap=4)) == 1
    assert len(plan_reads(gap.slaves[0], max_registers=125, max_bits=2000, max_gap=3)) == 2


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="single bit"):
        ModbusConfig.model_validate(
            {
                "type": "modbus",
                "host": "h",
                "registers": [{"name": "a", "address": 0, "function": "coil", "type": "float32"}],
            }
        )
    with pytest.raises(ValidationError, match="needs `host`"):
        ModbusConfig.model_validate({"type": "modbus", "registers": [{"name": "a", "address": 0}]})
    with pytest.raises(ValidationError, match="serial device"):
        ModbusConfig.model_validate(
            {"type": "modbus", "transport": "rtu", "registers": [{"name": "a", "address": 0}]}
        )
    with pytest.raises(ValidationError, match="appears twice"):
        ModbusConfig.model_validate(
            {
                "type": "modbus",
                "host": "h",
                "slaves": [{"id": 1}, {"id": 2}],
                "registers": [{"name": "a", "address": 0}],
            }
        )
    with pytest.raises(ValidationError, match="past address 65535"):
        ModbusConfig.model_validate(
            {
                "type": "modbus",
                "host": "h",
                "registers": [{"name": "a", "address": 65535, "type": "float32"}],
            }
        )
    bad = tmp_path / "map.yaml"
    bad.write_text("registers:\n  - {name: a, address: -1}\n")
    with pytest.raises(ValidationError, match=r"map.yaml: registers.0.address"):
        ModbusConfig.model_validate({"type": "modbus", "host": "h", "registers_file": str(bad)})


def test_sample_register_file_loads() -> None:
    cfg = ModbusConfig.model_validate(
        {
            "type": "modbus",
            "host": "h",
            "registers_file": str(ROOT / "sample_data" / "modbus-registers.yaml"),
        }
    )
    names = {r.name for r in cfg.slaves[0].registers or []}
    assert {"voltage_l1", "energy_import", "relay_closed", "tamper_alarm"} <= names
    assert cfg.every == 5.0


async def test_tcp_every_type_and_order(tmp_path: Path, tcp_server: int) -> None:
    src = make(
        tmp_path, source_config({"transport": "tcp", "host": "127.0.0.1", "port": tcp_server})
    )
    await src.open()
    try:
        check_all_values(await src.read())
        check_all_values(await src.read())  # a second tick on the same connection
    finally:
        await src.close()
    assert not [k for k in src.ctx.counters.values if k[0] == "modbus_errors_total"]


async def test_exception_responses_are_counted_per_register(
    tmp_path: Path, tcp_server: int
) -> None:
    cfg = source_config({"transport": "tcp", "host": "127.0.0.1", "port": tcp_server}, max_gap=8)
    cfg["slaves"][0]["registers"] = [
        {"name": "a", "address": 200},
        {"name": "b", "address": 205},  # gap unmapped: 201-204
        {"name": "ghost", "address": 500},  # unmapped: ILLEGAL_ADDRESS
        {"name": "relay", "address": 0, "function": "coil"},
    ]
    src = make(tmp_path, cfg)
    assert len(src.plan) == 4  # a+b grouped, ghost, relay, slave 2
    await src.open()
    try:
        first = by_key(await src.read())
        second = by_key(await src.read())
    finally:
        await src.close()
    for got in (first, second):
        assert got["m1", "a"]["value"] == 11 and got["m1", "b"]["value"] == 22
        assert ("m1", "ghost") not in got
        assert got["m1", "relay"]["value"] == 1.0 and got["m2", "count"]["value"] == 7
    counters = src.ctx.counters
    assert (
        counters.get(
            "modbus_errors_total",
            component="plc",
            slave="1",
            register="ghost",
            kind="illegal_address",
        )
        == 2
    )
    assert (
        counters.get(
            "modbus_errors_total", component="plc", slave="1", register="a", kind="illegal_address"
        )
        == 0
    )
    assert len(src.plan) == 5  # the refused group is read register by register from now on


async def test_unreachable_server_raises_source_error_then_recovers(
    tmp_path: Path, spec_file: Path
) -> None:
    port = free_port()
    src = make(tmp_path, source_config({"host": "127.0.0.1", "port": port}))
    await src.open()
    try:
        with pytest.raises(SourceError, match="cannot connect"):
            await src.read()
        with helper(["modbus_server.py", str(spec_file), "--tcp", str(port)], ready="ready"):
            check_all_values(await src.read())
    finally:
        await src.close()


async def test_rtu_over_a_pty_pair(tmp_path: Path, socat_pair: SocatPair, spec_file: Path) -> None:
    cfg = source_config({"transport": "rtu", "port": str(socat_pair.dev), "baudrate": 19200})
    cfg["slaves"].append({"id": 9, "device": "absent", "registers": [{"name": "x", "address": 0}]})
    src = make(tmp_path, cfg)
    with helper(
        ["modbus_server.py", str(spec_file), "--serial", str(socat_pair.sim), "--silent", "9"],
        ready="ready",
    ):
        await src.open()
        try:
            rows = await src.read()
            again = await src.read()  # the bus is usable after a slave timed out
        finally:
            await src.close()
    for got in (rows, again):
        check_all_values(got)
        assert ("absent", "x") not in by_key(got)
    counted = {k: v for k, v in src.ctx.counters.values.items() if k[0] == "modbus_errors_total"}
    assert list(counted.values()) == [2]
    labels = dict(next(iter(counted))[1])
    assert labels == {"component": "plc", "slave": "9", "register": "x", "kind": "timeout"}


def test_cli_once_lands_in_lake(tmp_path: Path, tcp_server: int) -> None:
    data = tmp_path / "data"
    regs = json.dumps(HOLDING[:8] + SLAVE1_EXTRA)
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""\
  - name: plc
    type: modbus
    host: 127.0.0.1
    port: {tcp_server}
    slaves: [{{id: 1, device: m1}}]
    registers: {regs}
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
    got = {r["metric"]: r for r in df.to_dicts()}
    assert set(df["device"]) == {"m1"} and set(df["source"]) == {"plc"}
    assert got["voltage"]["value"] == 230.5 and got["voltage"]["unit"] == "V"
    assert got["int16_big_big"]["value"] == -12345
    assert got["uint16_little_big"]["value"] == 54321
    assert df.filter(pl.col("metric") == "relay")["value"].to_list() == [1.0]
